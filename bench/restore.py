"""Restart cost of a worker with its RocksDB state kept (a StatefulSet's volume) against an empty state folder (a
Deployment's emptyDir), which rebuilds its tables from their changelogs.

One worker decides ``n`` clicks of ``users`` user keys and ``ips`` IPs, and stops gracefully. It is then started
twice more on the same topics and group: once on its own state folder, once on an empty one. Each restart is
timed from the process start to its first passing health verdict (``stream/health.py``: the verdict comes from a
Faust timer, which runs only once the tables have recovered and the partitions are assigned). The first run's
table keys (``slidr_table_keys``) and the changelogs' record counts say how much state there was.
``slidr bench restore [--set n=200000] [--set users=50000] [--set ips=250]`` (ips: the last octet's range, at most 256).
"""

from __future__ import annotations

import asyncio
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.e2e import bench_topics, consume_count, free_port, keyed, produce, stop_worker, worker_env
from bench.scale import _start


def _table_keys(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("slidr_table_keys{")}


def _changelog_records(s: Any) -> dict[str, int]:
    """Records in each table's changelog (end offsets summed over partitions): what an empty state replays."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from slidr.topics import changelog_topic

    async def ends() -> dict[str, int]:
        c = AIOKafkaConsumer(group_id=None, **s.kafka_client_kwargs())
        await c.start()
        try:
            out = {}
            for table in ("users", "ips"):
                tps = [TopicPartition(changelog_topic(s, table), p) for p in range(s.partitions)]
                out[table] = sum((await c.end_offsets(tps)).values())
            return out
        finally:
            await c.stop()

    return asyncio.run(ends())


def _until_healthy(env: dict[str, str], data_dir: Path, log: Path, port: int, timeout_s: float) -> tuple[float, Any]:
    from stream.health import probe

    t0 = time.monotonic()
    w = _start({**env, "SLIDR_METRICS_PORT": str(port)}, data_dir, log)
    while not probe(f"http://127.0.0.1:{port}/metrics")[0]:
        if w.poll() is not None:
            raise RuntimeError(f"the worker exited: {log.read_text()[-2000:]}")
        if time.monotonic() - t0 > timeout_s:
            stop_worker(w)
            raise RuntimeError("the worker did not become healthy in time")
        time.sleep(0.2)
    return time.monotonic() - t0, w


def run(n: int = 200_000, users: int = 50_000, ips: int = 250, timeout_s: float = 600.0) -> dict[str, Any]:
    from stream import toymodel
    from stream.synth import traffic

    with bench_topics("restore") as (s, t, tmp):
        toymodel.build_registry(s.registry_path, version="toy-bench")
        env = worker_env(s)
        kept, port = tmp / "state", free_port()
        clicks = traffic(n, seed=5, users=users, ips=ips)
        first_s, w = _until_healthy(env, kept, tmp / "w0.log", port, timeout_s)
        try:
            asyncio.run(produce(s, t.clicks, keyed(clicks)))
            decided = len({m.key for m in asyncio.run(consume_count(s, t.decisions, n, timeout_s))})
            time.sleep(6)  # two gauge ticks: the table-key gauges settle on the final counts
            keys = _table_keys(port)
        finally:
            stop_worker(w)
        changelog = _changelog_records(s)
        kept_s, w = _until_healthy(env, kept, tmp / "w1.log", port, timeout_s)
        stop_worker(w)
        empty_s, w = _until_healthy(env, tmp / "empty", tmp / "w2.log", port, timeout_s)
        stop_worker(w)
    return {"clicks": n, "decided": decided, "partitions": s.partitions, "cpu_cores": os.cpu_count(),
            "table_keys": keys, "changelog_records": changelog, "first_start_to_healthy_s": round(first_s, 2),
            "restart_with_state_kept_to_healthy_s": round(kept_s, 2),
            "restart_with_empty_state_to_healthy_s": round(empty_s, 2),
            "load_avg_1m": round(os.getloadavg()[0], 2)}
