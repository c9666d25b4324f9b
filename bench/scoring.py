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


def run(batch: int = 256, rounds: int = 2000, model: str | None = None, providers: str = "CPUExecutionProvider",
        **opts: Any) -> dict[str, Any]:
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
        for _ in range(50):  # warm-up
            decision_dicts(m, clicks, score_batch(m, np.asarray(rows, dtype=np.float32)), decided_at=clicks[0].ts)
        batched, single = [], []
        for _ in range(rounds):
            t = time.perf_counter()
            x = np.asarray(rows, dtype=np.float32)
            ds = decision_dicts(m, clicks, score_batch(m, x), decided_at=clicks[0].ts)
            [orjson.dumps(d) for d in ds]  # the wire records, as the worker builds them
            batched.append(time.perf_counter() - t)
        for _ in range(max(1, rounds // 20)):
            t = time.perf_counter()
            for c, r in zip(clicks, rows, strict=True):
                d = decision_dicts(m, [c], score_batch(m, np.asarray([r], dtype=np.float32)), decided_at=c.ts)
                orjson.dumps(d[0])
            single.append(time.perf_counter() - t)
    b, s1 = _pct(batched), _pct(single)
    return {"provider": m.provider, "model": m.version, "batch": batch, "rounds": rounds,
            **{f"batch_{k}": v for k, v in b.items()},
            **{f"per_click_x{batch}_{k}": v for k, v in s1.items()},
            "batched_us_per_click_p50": round(b["p50_ms"] * 1000 / batch, 2),
            "per_click_us_per_click_p50": round(s1["p50_ms"] * 1000 / batch, 2),
            "speedup_p50": round(s1["p50_ms"] / b["p50_ms"], 1)}
