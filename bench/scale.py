"""Scale-out: the same clicks through 1, then 2 workers (one consumer group each run), clicks/s for each.

Each run gets its own topics (same partition count, same clicks): its workers are started first and waited for
until each one's health verdict passes (``stream/health.py``: broker, assigned partitions, model), so no
rebalance falls inside the measurement; then the clicks are produced at full speed and the rate is the decided
clicks over the span from the first decision to the last (producer timestamps of the decisions), as ``slidr bench
e2e`` measures one worker. Workers are processes here (one per core on a 2-core machine); in a cluster they are
pods (deploy/k8s), and the partition count bounds how many can share the work.
``slidr bench scale [--set n=100000] [--set workers=[1,2]]``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.e2e import bench_topics, consume_count, keyed, produce, stop_worker, worker_env


def _free_port() -> int:
    import socket

    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        return int(so.getsockname()[1])


def _start(env: dict[str, str], data_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "slidr", "worker", "--data-dir", str(data_dir),
                             "--loglevel", "warning"], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def one_run(workers: int, clicks: list[Any], timeout_s: float) -> dict[str, Any]:
    from stream import toymodel
    from stream.health import probe

    with bench_topics(f"scale{workers}") as (s, t, tmp):
        toymodel.build_registry(s.registry_path, version="toy-bench")
        ports = [_free_port() for _ in range(workers)]
        procs = [_start({**worker_env(s), "SLIDR_METRICS_PORT": str(p)}, tmp / f"w{i}", tmp / f"w{i}.log")
                 for i, p in enumerate(ports)]
        try:
            t_end = time.monotonic() + timeout_s
            while not all(probe(f"http://127.0.0.1:{p}/metrics")[0] for p in ports):
                for i, w in enumerate(procs):
                    if w.poll() is not None:
                        raise RuntimeError(f"worker {i} exited: {(tmp / f'w{i}.log').read_text()[-2000:]}")
                if time.monotonic() > t_end:
                    raise RuntimeError("the workers did not all become healthy (assigned) in time")
                time.sleep(0.5)
            asyncio.run(produce(s, t.clicks, keyed(clicks)))
            msgs = asyncio.run(consume_count(s, t.decisions, len(clicks), timeout_s))
        finally:
            for w in procs:
                stop_worker(w)
        decided = len({m.key for m in msgs})
        ts = sorted(m.timestamp for m in msgs)
        span_s = max((ts[-1] - ts[0]) / 1000.0, 1e-3) if ts else float("nan")
        return {"workers": workers, "partitions": s.partitions, "decided": decided,
                "first_to_last_decision_s": round(span_s, 2), "clicks_per_s": round(decided / span_s)}


def run(n: int = 100_000, workers: list[int] | None = None, timeout_s: float = 600.0) -> dict[str, Any]:
    from stream.synth import traffic

    clicks = traffic(n, seed=7)
    load_before = os.getloadavg()[0]
    runs = [one_run(w, clicks, timeout_s) for w in (workers or [1, 2])]
    out: dict[str, Any] = {"clicks": n, "cpu_cores": os.cpu_count(), "load_avg_1m_before": round(load_before, 2)}
    for r in runs:
        k = f"{r['workers']}_worker{'s' if r['workers'] > 1 else ''}"
        out[f"{k}_clicks_per_s"] = r["clicks_per_s"]
        out[f"{k}_decided"] = r["decided"]
        out[f"{k}_first_to_last_decision_s"] = r["first_to_last_decision_s"]
    if len(runs) > 1 and runs[0]["clicks_per_s"]:
        out["speedup_last_vs_first"] = round(runs[-1]["clicks_per_s"] / runs[0]["clicks_per_s"], 2)
    out["partitions"] = runs[0]["partitions"]
    out["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    return out
