"""The worker's throughput with Prometheus metrics on vs off, on the same backlog of clicks.

Runs alternate (off, on, off, on, ...: ``rounds`` of each), each a fresh worker over its own topics holding the
same ``n`` clicks and the tail that follows them (``bench.e2e.backlog``); a run's rate is distinct clicks
decided over the first-to-last decision span once ``n`` are decided, as ``bench/e2e.py`` measures it. The cost is
1 - median(on) / median(off). ``slidr bench metrics_cost``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import numpy as np

from bench.e2e import backlog, bench_topics, consume_count, free_port, keyed, produce, running_worker


def _once(clicks: list[Any], n: int, metrics: bool, timeout_s: float) -> float:
    old = os.environ.get("SLIDR_METRICS_PORT")
    os.environ["SLIDR_METRICS_PORT"] = str(free_port()) if metrics else "0"
    try:
        with bench_topics("mcost") as (s, t, tmp):
            asyncio.run(produce(s, t.clicks, keyed(clicks)))
            with running_worker(s, tmp):
                msgs = asyncio.run(consume_count(s, t.decisions, n, timeout_s))
    finally:
        if old is None:
            os.environ.pop("SLIDR_METRICS_PORT", None)
        else:
            os.environ["SLIDR_METRICS_PORT"] = old
    ts = sorted(m.timestamp for m in msgs)
    return len({m.key for m in msgs}) / max((ts[-1] - ts[0]) / 1000.0, 1e-3)


def run(n: int = 60_000, rounds: int = 3, timeout_s: float = 300.0, **opts: Any) -> dict[str, Any]:
    clicks = backlog(n)  # n timed, then the tail
    off: list[float] = []
    on: list[float] = []
    for _ in range(rounds):
        off.append(_once(clicks, n, False, timeout_s))
        on.append(_once(clicks, n, True, timeout_s))
    m_off, m_on = float(np.median(off)), float(np.median(on))
    return {"clicks": n, "rounds": rounds, "off_clicks_per_s": [round(x) for x in off],
            "on_clicks_per_s": [round(x) for x in on], "median_off": round(m_off), "median_on": round(m_on),
            "cost": round(1 - m_on / m_off, 4)}
