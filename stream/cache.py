"""The Redis profile cache: ``slidr cache load DIR`` writes customers and IP-range flags, pipelined."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from slidr.settings import Settings
from stream.features import build_profiles


def profiles_from_dir(folder: Path) -> dict[str, bytes]:
    """Cache content of a dataset folder (customers.jsonl, ip_ranges.jsonl), as ``build_profiles`` makes it."""
    from models.data.dataset import iter_lines  # the dataset folder's own reader

    def objects(name: str) -> Iterator[dict[str, Any]]:
        return (orjson.loads(line) for line in iter_lines(folder / name))

    return build_profiles(objects("customers.jsonl"), objects("ip_ranges.jsonl"))


def load(s: Settings, profiles: dict[str, bytes], *, chunk: int = 10_000) -> int:
    """Write the profiles under ``<redis_key_prefix>:`` with pipelined MSETs; return the number of keys."""
    import redis

    r = redis.Redis.from_url(s.redis_url, **s.redis_kwargs())
    prefix = s.redis_key_prefix + ":"
    items = list(profiles.items())
    with r.pipeline(transaction=False) as p:
        for i in range(0, len(items), chunk):
            p.mset({prefix + k: v for k, v in items[i:i + chunk]})
        p.execute()
    return len(items)
