"""Replay throughput in each mode beside the live worker's, on the same ``n`` clicks and the same broker.

The live worker (toy model) decides a backlog of ``n`` clicks (first -> last decision, start-up excluded, as in
``bench/e2e.py``) and is stopped; then the whole backlog is replayed with another model, ``--all`` (every click's
decision re-sent: publishing is part of the cost), once per mode. A replay's time is its whole run: reading the
range, the feature log (rescore) or the replay agent's start-up, warm-up and both stages (recompute), reading
billing's view, publishing and checkpointing. ``slidr bench replay [--set n=20000]``.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any


def run(n: int = 100_000, timeout_s: float = 600.0, **opts: Any) -> dict[str, Any]:
    from bench.e2e import bench_topics, consume_count, keyed, produce, running_worker
    from stream import replay as R
    from stream import toymodel
    from stream.synth import traffic

    out: dict[str, Any] = {"clicks": n, "cpu_cores": os.cpu_count()}
    with bench_topics("replay") as (s, t, tmp):
        clicks = traffic(n, seed=7)
        asyncio.run(produce(s, t.clicks, keyed(clicks)))
        with running_worker(s, tmp):  # builds the registry (toy-bench, ACTIVE and STABLE)
            msgs = asyncio.run(consume_count(s, t.decisions, n, timeout_s))
        decided = len({m.key for m in msgs})
        ts = sorted(m.timestamp for m in msgs)
        span_s = max((ts[-1] - ts[0]) / 1000.0, 1e-3) if ts else float("nan")
        if decided < n:
            raise RuntimeError(f"the live worker decided {decided} of {n} clicks within {timeout_s} s")
        out["live_worker_clicks_per_s"] = round(decided / span_s)
        toymodel.build(s.registry_path / "toy-other", version="toy-other", threshold=0.5)
        ends = asyncio.run(R.log_bounds(s, t.clicks))[1]
        frm = ",".join(f"{p}:0" for p in sorted(ends))
        to = ",".join(f"{p}:{o}" for p, o in sorted(ends.items()))
        for mode in R.MODES:
            t0 = time.perf_counter()
            res = R.replay(s, frm, to, model="toy-other", mode=mode, send_all=True)
            wall = time.perf_counter() - t0
            out[f"{mode}_clicks_per_s"] = round(res.clicks / wall)
            out[f"{mode}_seconds"] = round(wall, 2)
            out[f"{mode}_published"] = res.tally.published
            if mode == "recompute":
                out["recompute_agent_seconds"] = res.extra["agent_seconds"]
        for mode in R.MODES:
            out[f"{mode}_vs_live"] = round(out[f"{mode}_clicks_per_s"] / out["live_worker_clicks_per_s"], 3)
    return out
