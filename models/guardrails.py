"""Checks that refuse to train or calibrate on data that would give a silently wrong model."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

HOUR_MS = 3_600_000
GAP_P_VALUE = 1e-6  # an hour with no purchase is a label gap when P(0 purchases | its click volume) < this


class GuardrailError(ValueError):
    """Training data that must not be used as it is."""


def check_features(x: npt.NDArray[np.float32], names: tuple[str, ...]) -> None:
    """Right width, all finite."""
    if x.ndim != 2 or x.shape[1] != len(names):
        raise GuardrailError(f"feature matrix has shape {x.shape}, expected (N, {len(names)})")
    bad = ~np.isfinite(x)
    if bad.any():
        cols = sorted({names[j] for j in np.flatnonzero(bad.any(axis=0))})
        raise GuardrailError(f"non-finite feature values in {', '.join(cols)}")


def label_gap_hours(ts_ms: npt.NDArray[np.int64], purchased: npt.NDArray[np.bool_],
                    excluded: npt.NDArray[np.bool_] | None = None) -> list[int]:
    """Clock hours (epoch ms of their start) with no purchase although their volume makes one near-certain.

    The expected count of an hour is the overall purchase rate times its clicks (rows in ``excluded``, e.g.
    declared outages, do not count); zero purchases with P(0) = exp(-expected) < GAP_P_VALUE is a gap.
    """
    keep = np.ones(len(ts_ms), dtype=bool) if excluded is None else ~excluded
    if not keep.any():
        return []
    hour = ts_ms[keep] // HOUR_MS
    rate = float(purchased[keep].mean())
    hours, inv = np.unique(hour, return_inverse=True)
    clicks = np.bincount(inv)
    buys = np.bincount(inv, weights=purchased[keep].astype(np.float64))
    lam_min = -math.log(GAP_P_VALUE)
    gaps = (buys == 0) & (clicks * rate > lam_min)
    return [int(h) * HOUR_MS for h in hours[gaps]]


def check_label_gaps(ts_ms: npt.NDArray[np.int64], purchased: npt.NDArray[np.bool_],
                     excluded: npt.NDArray[np.bool_] | None = None) -> None:
    """Refuse data with undeclared hours missing purchase labels (declared outages are excluded upstream)."""
    gaps = label_gap_hours(ts_ms, purchased, excluded)
    if gaps:
        from datetime import UTC, datetime

        shown = ", ".join(datetime.fromtimestamp(h / 1000, UTC).strftime("%Y-%m-%d %H:00") for h in gaps[:5])
        raise GuardrailError(
            f"{len(gaps)} hour(s) have clicks but no purchase labels ({shown}{' ...' if len(gaps) > 5 else ''} "
            "UTC): purchase attribution looks broken there. Declare them in meta.json label_outages "
            "(they are then left out) or set allow_label_gaps=True.")


def check_split(label: npt.NDArray[np.int8], purchased: npt.NDArray[np.bool_], name: str) -> None:
    """A split needs both weak labels and some purchases."""
    if len(label) == 0:
        raise GuardrailError(f"{name} split is empty")
    if label.min() == label.max():
        raise GuardrailError(f"{name} split has only weak label {int(label[0])}")
    if not purchased.any():
        raise GuardrailError(f"{name} split has no purchasing clicks: FPR is undefined")
