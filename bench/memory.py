"""State size per tracked key: per 100k user keys and per 100k IPs.

Measures (1) the RSS growth of this process holding 100k live states as Python dicts (what the offline
``featurize`` driver keeps; an upper bound of an in-memory table) and (2) the serialized bytes per state (what
the worker keeps per key in RocksDB and the changelog). Each key gets ``clicks_per_key`` clicks spread over an
hour. Note: this is not the RSS of a running worker, whose RocksDB store keeps states on disk.
``slidr bench memory [--set keys=100000]``.
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


def run(keys: int = 100_000, clicks_per_key: int = 5, **opts: Any) -> dict[str, Any]:
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
    return out
