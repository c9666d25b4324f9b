"""Simulator speed: wall time to simulate and write N clicks (``slidr bench simulate --set clicks=1000000``)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any


def run(clicks: int = 1_000_000, scenario: str = "large", seed: int = 0, repeat: int = 1) -> dict[str, Any]:
    from models.data.simulate import simulate

    best_sim = best_total = float("inf")
    sim = None
    for _ in range(int(repeat)):
        t0 = time.perf_counter()
        sim = simulate(scenario, seed, clicks=int(clicks))
        t1 = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            sim.write(Path(d))
            size = sum(f.stat().st_size for f in Path(d).iterdir())
        t2 = time.perf_counter()
        best_sim, best_total = min(best_sim, t1 - t0), min(best_total, t2 - t0)
    assert sim is not None
    return {
        "scenario": scenario,
        "clicks": sim.n_clicks,
        "purchases": sim.purchases.count(b"\n"),
        "bots": int(sim.is_bot.sum()),
        "simulate_s": round(best_sim, 2),
        "simulate_and_write_s": round(best_total, 2),
        "clicks_per_s": round(sim.n_clicks / best_total),
        "dataset_mb": round(size / 1e6, 1),
        "repeat": int(repeat),
    }
