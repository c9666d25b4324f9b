"""Scoring alone: features -> decisions for a batch of 256 (p50/p99/p99.9), versus one click per ONNX call.

Uses the toy logistic model unless ``model=<folder>`` is given. ``slidr bench scoring [--set batch=256]``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from stream import features as F
from stream.scoring import decision_dicts, load_model, score_batch


def _pct(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1000.0
    return {"p50_ms": round(float(np.percentile(a, 50)), 4), "p99_ms": round(float(np.percentile(a, 99)), 4),
            "p99_9_ms": round(float(np.percentile(a, 99.9)), 4)}


def _time_batches(m: Any, clicks: list[Any], rows: list[list[float]], rounds: int, reasons: bool) -> list[float]:
    """Seconds per batch on the worker's path: matrix, one ONNX call, decision dicts (reason codes when
    ``reasons``: the extra occlusion call over the invalid clicks), the wire records."""
    for _ in range(50):  # warm-up
        x = np.asarray(rows, dtype=np.float32)
        decision_dicts(m, clicks, score_batch(m, x), decided_at=clicks[0].ts, features=x if reasons else None)
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        x = np.asarray(rows, dtype=np.float32)
        ds = decision_dicts(m, clicks, score_batch(m, x), decided_at=clicks[0].ts, features=x if reasons else None)
        [orjson.dumps(d) for d in ds]  # the wire records, as the worker builds them
        out.append(time.perf_counter() - t)
    return out


def run(batch: int = 256, rounds: int = 2000, model: str | None = None, providers: str = "CPUExecutionProvider",
        **opts: Any) -> dict[str, Any]:
    """The batch figures include reason codes (as the worker decides); ``no_reasons_*`` without them, and
    ``all_invalid_*`` with every click of the batch invalid (thresholds 0: the occlusion call at its largest);
    for a model with an explainer (an ensemble's member 0), ``all_invalid_whole_ensemble_reasons_*`` with the
    occlusion call on the whole ensemble instead, in the same run."""
    from stream.synth import traffic  # the same small generator the tests use

    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            from stream import toymodel

            folder = toymodel.build(Path(tmp) / "toy")
        else:
            folder = Path(model)
        m = load_model(folder, providers)
        clicks = traffic(batch, seed=1)
        rows = [list(map(float, r)) for r in F.featurize(clicks, {})]
        x = np.asarray(rows, dtype=np.float32)
        invalid_share = float(np.mean([not d["valid"] for d in decision_dicts(
            m, clicks, score_batch(m, x), decided_at=0)]))
        batched = _time_batches(m, clicks, rows, rounds, reasons=True)
        bare = _time_batches(m, clicks, rows, rounds, reasons=False)
        thresholds, default = dict(m.thresholds), m.default_threshold
        m.thresholds, m.default_threshold = {}, 0.0  # every click invalid
        worst = _time_batches(m, clicks, rows, max(1, rounds // 4), reasons=True)
        explainer, m.explainer = m.explainer, None  # an ensemble's reasons from all its members, for comparison
        worst_all = _time_batches(m, clicks, rows, max(1, rounds // 4), reasons=True) if explainer else None
        m.explainer = explainer
        m.thresholds, m.default_threshold = thresholds, default
        single = []
        for _ in range(max(1, rounds // 20)):
            t = time.perf_counter()
            for c, r in zip(clicks, rows, strict=True):
                xr = np.asarray([r], dtype=np.float32)
                d = decision_dicts(m, [c], score_batch(m, xr), decided_at=c.ts, features=xr)
                orjson.dumps(d[0])
            single.append(time.perf_counter() - t)
    b, s1, nr, w = _pct(batched), _pct(single), _pct(bare), _pct(worst)
    wa = _pct(worst_all) if worst_all else {}
    return {"provider": m.provider, "model": m.version, "batch": batch, "rounds": rounds,
            "reason_codes": m.reference is not None, "invalid_share": round(invalid_share, 3),
            "explainer": (m.manifest.get("explainer") or {}).get("of") if m.explainer is not None else None,
            **{f"batch_{k}": v for k, v in b.items()},
            **{f"no_reasons_batch_{k}": v for k, v in nr.items()},
            **{f"all_invalid_batch_{k}": v for k, v in w.items()},
            **{f"all_invalid_whole_ensemble_reasons_batch_{k}": v for k, v in wa.items()},
            **{f"per_click_x{batch}_{k}": v for k, v in s1.items()},
            "batched_us_per_click_p50": round(b["p50_ms"] * 1000 / batch, 2),
            "per_click_us_per_click_p50": round(s1["p50_ms"] * 1000 / batch, 2),
            "reasons_cost_p50": round(b["p50_ms"] / nr["p50_ms"], 2),
            "speedup_p50": round(s1["p50_ms"] / b["p50_ms"], 1)}
