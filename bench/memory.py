"""State size per tracked key: per 100k user keys and per 100k IPs.

Measures (1) the RSS growth of this process holding 100k live states as Python dicts (what the offline
``featurize`` driver keeps; an upper bound of an in-memory table), (2) the serialized bytes per state (what
the worker keeps per key in RocksDB and the changelog; each key gets ``clicks_per_key`` clicks spread over an
hour) and (3), with ``worker=True`` (the default), a running worker's own growth: its RSS and its state folder
on disk after ``keys`` clicks of new user keys, then after ``keys`` clicks from new IPs, each measured against
the worker warmed up on other traffic. ``slidr bench memory [--set keys=100000] [--set worker=false]``.
"""

from __future__ import annotations

import gc
import random
from typing import Any

import orjson

from stream import features as F
from stream.synth import T0, click


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _worker_growth(keys: int, timeout_s: float = 600.0) -> dict[str, Any]:
    """RSS and state-folder growth of a real worker per 100k new user keys, then per 100k new IPs."""
    import asyncio
    import subprocess
    import time
    from pathlib import Path

    from bench.e2e import bench_topics, consume_count, keyed, produce, running_worker
    from stream.synth import traffic

    def rss(pid: int) -> int:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * 4096

    def disk(path: Path) -> int:
        return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True).stdout.split()[0])

    out: dict[str, Any] = {}
    warm = traffic(20_000, seed=3)  # 300 users, 60 IPs: past start-up allocations, caches and buffers
    new_users = [click(10**6 + i, warm[-1].ts + 1000 + i, ip="10.250.0.1", session=f"mem-user-{i}")
                 for i in range(keys)]
    new_ips = [click(2 * 10**6 + i, new_users[-1].ts + 1000 + i, session=f"mem-s{i % 50}",
                     ip=f"11.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}") for i in range(keys)]
    with bench_topics("mem") as (s, t, tmp), running_worker(s, tmp) as w:
        decided, prev = 0, (0, 0)
        for name, batch in (("warm-up", warm), ("users", new_users), ("ips", new_ips)):
            asyncio.run(produce(s, t.clicks, keyed(batch)))
            decided += len(batch)
            if len({m.key for m in asyncio.run(consume_count(s, t.decisions, decided, timeout_s))}) < decided:
                raise RuntimeError(f"the worker did not decide all {name} clicks in {timeout_s} s")
            time.sleep(3)  # the last flushes and changelog acknowledgements
            r, d = rss(w.pid), disk(s.home / "faust")
            if name != "warm-up":
                out[f"worker_{name}_rss_mib_per_100k"] = round((r - prev[0]) / 2**20 * 100_000 / keys, 1)
                out[f"worker_{name}_disk_mib_per_100k"] = round((d - prev[1]) / 2**20 * 100_000 / keys, 1)
            prev = (r, d)
        out["worker_rss_mib_end"] = round(prev[0] / 2**20, 1)
    return out


def run(keys: int = 100_000, clicks_per_key: int = 5, worker: bool = True, **opts: Any) -> dict[str, Any]:
    rnd = random.Random(0)
    out: dict[str, Any] = {"keys": keys, "clicks_per_key": clicks_per_key}
    for kind in ("users", "ips"):
        gc.collect()
        before = _rss_bytes()
        states: dict[str, F.State] = {}
        size = 0
        for k in range(keys):
            st = None
            for j in range(clicks_per_key):
                ts = T0 + j * 600_000 + rnd.randint(0, 60_000)
                if kind == "users":
                    c = click(j, ts, session=f"s{k}")
                    st, _ = F.update_user(st, c, (0, j))
                else:
                    c = click(j, ts, ip=f"10.{k >> 16 & 255}.{k >> 8 & 255}.{k & 255}", session=f"s{k}-{j}")
                    st, _ = F.update_ip(st, c, (0, j))
            assert st is not None
            states[str(k)] = st
            size += len(orjson.dumps(st))
        gc.collect()
        grow = _rss_bytes() - before
        out[f"{kind}_rss_mib_per_100k"] = round(grow / 2**20 * 100_000 / keys, 1)
        out[f"{kind}_serialized_bytes_per_key"] = round(size / keys, 1)
        out[f"{kind}_serialized_mib_per_100k"] = round(size / 2**20 * 100_000 / keys, 1)
        del states
    if worker:
        out.update(_worker_growth(keys))
    return out
