"""Checks that refuse to train or calibrate on data that would give a silently wrong model, and the retrain
guardrails (data and model checks with a readable report: ``Report.lines()``, ``Report.to_dict()``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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


# ---- retrain guardrails: checks with a readable report (slidr retrain) -----------------------------------------
DOW = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


@dataclass
class Check:
    """One guardrail check: ``kind`` data | model, ``name`` e.g. ``label_gaps`` or ``ivr_delta:desktop:in``."""

    kind: str
    name: str
    ok: bool
    detail: str
    values: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.kind}.{self.name}: {self.detail}"


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def lines(self) -> list[str]:
        """One line per failed check."""
        return [c.line() for c in self.failed()]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "failed": [f"{c.kind}.{c.name}" for c in self.failed()],
                "checks": [asdict(c) for c in self.checks]}


def _hour_name(h_ms: int) -> str:
    return datetime.fromtimestamp(h_ms / 1000, UTC).strftime("%Y-%m-%d %H:00 UTC")


def _how_name(how: int) -> str:
    return f"{DOW[how // 24]} {how % 24:02d}:00 UTC"


def hour_of_week(ts_ms: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """UTC hour of the week, Monday 00:00 = 0 (1970-01-01 was a Thursday)."""
    return np.asarray((ts_ms // HOUR_MS + 3 * 24) % 168, dtype=np.int64)


def check_non_finite(x: npt.NDArray[np.float32], names: tuple[str, ...]) -> Check:
    bad = ~np.isfinite(x)
    cols = sorted({names[j] for j in np.flatnonzero(bad.any(axis=0))}) if x.ndim == 2 and len(x) else []
    return Check("data", "non_finite_features", not cols,
                 f"{int(bad.any(axis=1).sum())} row(s) with non-finite values in {', '.join(cols)}" if cols
                 else f"all {len(x)} rows finite", {"columns": cols, "rows": int(bad.any(axis=1).sum())})


def check_purchase_density(ts_ms: npt.NDArray[np.int64], purchased: npt.NDArray[np.bool_], min_density: float,
                           min_clicks: int) -> Check:
    """Every hour of the week present with at least ``min_clicks`` clicks has a purchase share >= min_density."""
    how = hour_of_week(ts_ms)
    n = np.bincount(how, minlength=168)
    p = np.bincount(how, weights=purchased.astype(np.float64), minlength=168)
    judged = n >= min_clicks
    low = judged & (p < min_density * n)
    bad = [f"{_how_name(int(h))} ({int(n[h])} clicks, {int(p[h])} purchases)" for h in np.flatnonzero(low)]
    present = int((n > 0).sum())
    return Check("data", "purchase_density", not bad,
                 f"{len(bad)} hour(s) of the week below {min_density:g} purchases per click: {'; '.join(bad)}" if bad
                 else f"{int(judged.sum())} of {present} hours of the week judged (>= {min_clicks} clicks), "
                      f"all >= {min_density:g}",
                 {"hours": [int(h) for h in np.flatnonzero(low)], "judged": int(judged.sum()), "present": present})


def check_label_gap_hours(ts_ms: npt.NDArray[np.int64], purchased: npt.NDArray[np.bool_],
                          purchase_ts_ms: npt.NDArray[np.int64], p_value: float,
                          outages: Sequence[tuple[int, int]] = ()) -> Check:
    """Hours of the window with traffic but no purchase event although its volume makes one near-certain.

    A purchase outage loses the purchase events of some hours (``purchase_ts_ms``: the purchases attributed to the
    window's clicks, at their own time), whatever clicks they belong to. Expected purchase events of a clock hour:
    the window's purchases per click times that hour's clicks; none with P(0) = exp(-expected) < ``p_value`` is a
    gap. Hours overlapping a declared outage (dataset meta.json) are left out: they are known.
    """
    if len(ts_ms) == 0:
        return Check("data", "label_gaps", True, "no clicks")
    hours, n = np.unique(ts_ms // HOUR_MS, return_counts=True)
    rate = float(purchased.sum()) / len(ts_ms)
    got = np.isin(hours, np.unique(purchase_ts_ms // HOUR_MS))
    declared = np.zeros(len(hours), dtype=bool)
    for a, b in outages:
        declared |= (hours * HOUR_MS < b) & ((hours + 1) * HOUR_MS > a)
    gaps = hours[~got & ~declared & (n * rate > -math.log(p_value))]
    names = [_hour_name(int(h) * HOUR_MS) for h in gaps]
    return Check("data", "label_gaps", not names,
                 f"{len(names)} hour(s) have clicks but no purchase labels: {', '.join(names)} (purchase attribution "
                 "looks broken there)" if names
                 else f"no hour without purchases where {-math.log(p_value):.1f} were expected "
                      f"({int(declared.sum())} declared outage hour(s) left out)",
                 {"hours": names, "hours_ms": [int(h) * HOUR_MS for h in gaps], "purchase_rate": rate})


def slice_volume(ts_ms: npt.NDArray[np.int64], slices: npt.NDArray[np.str_]) -> dict[str, Any]:
    """Clicks per slice and the window's length in hours (stored with each retrain, compared with the next)."""
    hours = max(1.0, (int(ts_ms.max()) - int(ts_ms.min()) + 1) / HOUR_MS) if len(ts_ms) else 1.0
    names, counts = np.unique(slices, return_counts=True)
    return {"hours": hours, "slices": {str(s): int(c) for s, c in zip(names, counts, strict=True)}}


def check_volume(cur: dict[str, Any], prev: dict[str, Any] | None, max_ratio: float, min_clicks: int) -> Check:
    """Each slice's clicks per hour within [1/max_ratio, max_ratio] of the previous window's."""
    if prev is None:
        return Check("data", "slice_volume", True, "no previous window to compare with")
    bad, ratios = [], {}
    for s in sorted(set(cur["slices"]) | set(prev["slices"])):
        a, b = cur["slices"].get(s, 0), prev["slices"].get(s, 0)
        if max(a, b) < min_clicks:
            continue
        r = (a / cur["hours"]) / (b / prev["hours"]) if b else math.inf
        ratios[s] = r
        if not 1 / max_ratio <= r <= max_ratio:
            bad.append(f"{s} {r:.2f}x ({a} clicks in {cur['hours']:.0f} h vs {b} in {prev['hours']:.0f} h)")
    return Check("data", "slice_volume", not bad,
                 f"clicks per hour against the previous window outside [1/{max_ratio:g}, {max_ratio:g}]: "
                 + "; ".join(bad) if bad else f"{len(ratios)} slice(s) within {max_ratio:g}x of the previous window",
                 {"ratios": ratios})


def data_checks(x: npt.NDArray[np.float32], ts_ms: npt.NDArray[np.int64], purchased: npt.NDArray[np.bool_],
                slices: npt.NDArray[np.str_], purchase_ts_ms: npt.NDArray[np.int64], s: Any,
                prev_volume: dict[str, Any] | None = None, outages: Sequence[tuple[int, int]] = (),
                label_gaps: bool = True) -> Report:
    """The data guardrails of one window (``s``: Settings). Rows are the window's usable clicks."""
    from stream.features import FEATURE_NAMES

    checks = [check_non_finite(x, FEATURE_NAMES),
              check_purchase_density(ts_ms, purchased, s.guard_min_purchase_density, s.guard_min_hour_clicks)]
    if label_gaps:
        checks.append(check_label_gap_hours(ts_ms, purchased, purchase_ts_ms, s.guard_label_gap_p_value, outages))
    checks.append(check_volume(slice_volume(ts_ms, slices), prev_volume, s.guard_volume_max_ratio,
                               s.guard_volume_min_clicks))
    return Report(checks)


def model_checks(cand: dict[str, Any], stable: dict[str, Any] | None, s: Any,
                 why_none: str = "no stable model") -> Report:
    """The model guardrails: per slice, the candidate's IVR, FPR and coverage on the evaluation window against
    the stable model's on the same rows (``metrics.evaluate`` output) and an FPR ceiling."""
    checks: list[Check] = []

    def add(name: str, sl: str, ok: bool, detail: str, **values: Any) -> None:
        checks.append(Check("model", f"{name}:{sl}", ok, f"{sl}: {detail}", values))

    for sl, c in sorted(cand["slices"].items()):
        fpr_judged = c["n_purchased"] >= s.guard_min_slice_purchases
        if fpr_judged:
            add("fpr_max", sl, c["fpr"] <= s.guard_max_fpr, f"FPR {c['fpr']:.4f} (ceiling {s.guard_max_fpr:g}, "
                f"{c['n_purchased']} purchasing clicks)", fpr=c["fpr"])
        b = (stable or {}).get("slices", {}).get(sl)
        if b is None:
            continue
        d = c["ivr"] - b["ivr"]
        add("ivr_delta", sl, abs(d) <= s.guard_ivr_max_delta,
            f"IVR {c['ivr']:.4f} vs stable {b['ivr']:.4f} (|delta| <= {s.guard_ivr_max_delta:g})", delta=d)
        far = c["ivr"] > s.guard_ivr_max_ratio * b["ivr"] and d > s.guard_ivr_max_delta / 2
        add("ivr_ratio", sl, not far, f"invalidates {c['ivr'] / b['ivr'] if b['ivr'] else math.inf:.2f}x the stable "
            f"model's share (at most {s.guard_ivr_max_ratio:g}x)", candidate=c["ivr"], stable=b["ivr"])
        if fpr_judged and math.isfinite(b["fpr"]):
            d = c["fpr"] - b["fpr"]
            add("fpr_delta", sl, d <= s.guard_fpr_max_increase,
                f"FPR {c['fpr']:.4f} vs stable {b['fpr']:.4f} (at most +{s.guard_fpr_max_increase:g})", delta=d)
        if c["n_robotic"] >= s.guard_min_slice_robotic and math.isfinite(b["coverage"]):
            d = b["coverage"] - c["coverage"]
            add("coverage_drop", sl, d <= s.guard_coverage_max_drop,
                f"coverage {c['coverage']:.4f} vs stable {b['coverage']:.4f} (at most -{s.guard_coverage_max_drop:g})",
                drop=d)
    if stable is None:
        checks.append(Check("model", "stable_baseline", True, f"{why_none}: only the FPR ceiling applies"))
    return Report(checks)


def model_slice_metrics(model_dir: Path, x: npt.NDArray[np.float32], purchased: npt.NDArray[np.bool_],
                        heavy: npt.NDArray[np.bool_], slices: npt.NDArray[np.str_],
                        label: npt.NDArray[np.int8]) -> dict[str, Any]:
    """IVR, FPR, coverage overall and per slice of a model folder's decisions on these rows, loaded and scored as
    the stream does (``stream.scoring``: the files' sha256 and the feature spec are checked)."""
    from models.metrics import evaluate, row_thresholds
    from stream.scoring import load_model, score_batch

    m = load_model(model_dir)
    scores = score_batch(m, x) if len(x) else np.zeros(0, dtype=np.float32)
    return evaluate(scores, row_thresholds(slices, m.thresholds, m.default_threshold), purchased, heavy, slices,
                    label)
