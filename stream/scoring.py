"""Scoring: load a model folder, score feature batches with onnxruntime, turn scores into billing decisions.

A model folder holds ``model.onnx`` (input ``features`` float32 [N, F], output ``score`` float32 [N]),
``calibration.json`` (slice thresholds) and ``manifest.json`` (version, feature-spec hash, file hashes); see
docs/design.md. A model whose feature spec differs from ``stream.features`` is refused.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from schemas.events import Decision, slice_of
from stream.features import FEATURE_NAMES, FEATURE_SPEC_HASH

log = logging.getLogger(__name__)
INPUT_NAME = "features"
OUTPUT_NAME = "score"


class ModelError(RuntimeError):
    """A model folder that cannot be used (missing files, wrong feature spec, bad hash)."""


@dataclass
class Model:
    version: str
    folder: Path
    session: Any  # onnxruntime.InferenceSession
    provider: str  # the execution provider actually in use
    default_threshold: float
    thresholds: dict[str, float] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    def threshold(self, slice_: str) -> float:
        return self.thresholds.get(slice_, self.default_threshold)


def active_model_dir(registry_path: Path) -> Path:
    """The folder of the registry's active model (``ACTIVE`` names the version)."""
    active = registry_path / "ACTIVE"
    if not active.exists():
        raise ModelError(f"no active model: {active} does not exist (train and activate one first)")
    return registry_path / active.read_text().strip()


def _providers(wanted: str | Sequence[str]) -> list[str]:
    import onnxruntime as ort

    names = [p.strip() for p in wanted.split(",")] if isinstance(wanted, str) else list(wanted)
    avail = set(ort.get_available_providers())
    chosen = [p for p in names if p in avail]
    return chosen or ["CPUExecutionProvider"]


def load_model(folder: Path, providers: str | Sequence[str] = "CPUExecutionProvider", *,
               threads: int = 1) -> Model:
    """Load and check a model folder; refuse a feature-spec mismatch. ``threads``: onnxruntime intra-op."""
    import onnxruntime as ort

    folder = Path(folder)
    try:
        manifest = orjson.loads((folder / "manifest.json").read_bytes())
        calib = orjson.loads((folder / "calibration.json").read_bytes())
        onnx_bytes = (folder / "model.onnx").read_bytes()
    except FileNotFoundError as e:
        raise ModelError(f"incomplete model folder {folder}: {e.filename} missing") from None
    spec = manifest.get("feature_spec_hash")
    if spec != FEATURE_SPEC_HASH:
        raise ModelError(
            f"model {folder} was trained on feature spec {spec!r} but this stream computes "
            f"{FEATURE_SPEC_HASH!r} ({len(FEATURE_NAMES)} features): retrain or deploy the matching code"
        )
    want = manifest.get("sha256", {}).get("model.onnx")
    if want and hashlib.sha256(onnx_bytes).hexdigest() != want:
        raise ModelError(f"model {folder}: model.onnx does not match the sha256 in its manifest")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads  # small batches: one thread beats thread-pool wake-ups
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_bytes, sess_options=opts, providers=_providers(providers))
    active = sess.get_providers()[0]  # onnxruntime-gpu falls back to CPU silently: report what runs
    log.info("model %s loaded on %s (asked for %s)", manifest.get("model_version"), active, providers)
    return Model(
        version=str(manifest.get("model_version") or folder.name),
        folder=folder,
        session=sess,
        provider=active,
        default_threshold=float(calib.get("default_threshold", 0.5)),
        thresholds={k: float(v) for k, v in (calib.get("thresholds") or {}).items()},
        manifest=manifest,
    )


def score_batch(model: Model, matrix: np.ndarray) -> np.ndarray:
    """P(robot) for each row of a raw feature matrix ``[N, F]`` (float32)."""
    x = np.ascontiguousarray(matrix, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != len(FEATURE_NAMES):
        raise ValueError(f"expected a [N, {len(FEATURE_NAMES)}] matrix, got {x.shape}")
    (out,) = model.session.run([OUTPUT_NAME], {INPUT_NAME: x})
    return np.asarray(out, dtype=np.float32).reshape(-1)


def decision_dicts(model: Model, clicks: Sequence[Any], scores: np.ndarray, *, decided_at: int, revision: int = 0,
                   replay_id: str | None = None, degraded: bool = False) -> list[dict[str, Any]]:
    """One decision per click as a dict in ``Decision``'s field order (``orjson.dumps`` of it is the wire record,
    byte for byte ``Decision.to_json()``): invalid when ``score >= threshold`` of the click's slice. The worker's
    hot path builds these instead of models: the values are ours and in range, and tests check that they pass
    the strict schema."""
    out: list[dict[str, Any]] = []
    version = model.version
    for c, s in zip(clicks, scores.tolist(), strict=True):
        sl = slice_of(c.platform, c.logged_in)
        thr = model.threshold(sl)
        score = min(max(s, 0.0), 1.0) if s == s else 1.0  # a NaN score is treated as certain robot
        valid = score < thr
        out.append({
            "v": 1, "click_id": c.click_id, "valid": valid, "score": score, "threshold": thr, "slice": sl,
            "model_version": version, "revision": revision, "replay_id": replay_id, "decided_at": decided_at,
            "reason": "" if valid else f"score {score:.3f} >= {thr:.3f} on {sl}",
            "event_ts": c.ts, "advertiser_id": c.advertiser_id, "cpc": c.cpc, "degraded": degraded,
        })
    return out


def decide(model: Model, clicks: Sequence[Any], scores: np.ndarray, *, decided_at: int, revision: int = 0,
           replay_id: str | None = None, degraded: bool = False) -> list[Decision]:
    """One Decision per click: invalid when ``score >= threshold`` of the click's slice."""
    return [Decision.model_construct(**d) for d in decision_dicts(
        model, clicks, scores, decided_at=decided_at, revision=revision, replay_id=replay_id, degraded=degraded)]
