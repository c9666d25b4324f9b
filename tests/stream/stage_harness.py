"""Both stages of the worker in the test process, without a broker: RocksDB-backed table writers, a publisher that
collects records, events built by hand (quix-streams' ``StreamingDataFrame.test`` / bytewax's ``run_main`` idea).

``Harness.feed(clicks)`` sends clicks through the user stage (one batch, keyed by user key, offsets counted per
partition as Kafka would), then every by-ip record it produced through the IP stage, and returns what came out.
Redis is unreachable here (port 1): the IP stage scores in degraded mode, which changes no table state.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import rocksdict

from schemas.events import Click
from slidr.settings import Settings
from slidr.topics import Topics
from stream import toymodel
from stream.publish import key_partition
from stream.scoring import load_model
from stream.stages import IpStage, UserStage
from stream.state import TableWriter


class Collector:
    """A Publisher stand-in: keeps every record added; ``flush`` moves them to ``sent``."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self.pending: list[tuple[str, bytes | None, bytes | None, int]] = []
        self.sent: list[tuple[str, bytes | None, bytes | None, int]] = []

    def add(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None,
            headers: Any = None) -> None:
        if partition is None:
            assert key is not None
            partition = key_partition(key, self.partitions)
        self.pending.append((topic, key, value, partition))

    def discard(self) -> None:
        self.pending = []

    async def flush(self) -> list[tuple[str, int, int, Any]]:
        self.sent += self.pending
        self.pending = []
        return []


def table_writer(folder: Path, name: str) -> tuple[TableWriter, dict[int, rocksdict.Rdict]]:
    """A TableWriter over real RocksDB databases (one per partition), as Faust's store would hold them."""
    dbs: dict[int, rocksdict.Rdict] = {}

    def db_for(p: int) -> rocksdict.Rdict:
        if p not in dbs:
            dbs[p] = rocksdict.Rdict(str(folder / f"{name}-p{p}"), options=rocksdict.Options(raw_mode=True))
        return dbs[p]

    store = SimpleNamespace(_db_for_partition=db_for, _dbs=dbs, set_persisted_offset=lambda tp, o: None)
    table = SimpleNamespace(data=store, changelog_topic=SimpleNamespace(get_topic_name=lambda: f"{name}-changelog"))
    return TableWriter(table), dbs


class Harness:
    def __init__(self, folder: Path, **settings: Any) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.s = Settings(redis_url="redis://127.0.0.1:1/0", redis_timeout_s=0.2, **settings)
        self.t = Topics("h")
        toymodel.build_registry(folder / "registry", version="toy-h", threshold=0.7)
        model = load_model(folder / "registry" / "toy-h")
        uw, self.user_dbs = table_writer(folder, "users")
        iw, self.ip_dbs = table_writer(folder, "ips")
        self.users = UserStage(self.s, self.t, uw, lambda: None, "h.by-user", "h.by-ip")
        self.ips = IpStage(self.s, self.t, iw, lambda: None, "h.by-ip", model)
        self.users.out = Collector(self.s.partitions)  # type: ignore[assignment]
        self.ips.out = Collector(self.s.partitions)  # type: ignore[assignment]
        self.offsets: dict[tuple[str, int], int] = defaultdict(int)
        self.out: list[tuple[str, bytes | None, bytes | None, int]] = []
        self.skew = 0.0  # the IP stage's wall clock runs ahead by this (to let held clicks go at once)
        self.ips.now = lambda: time.monotonic() + self.skew

    def _event(self, topic: str, partition: int, key: bytes | None, value: bytes) -> Any:
        off = self.offsets[(topic, partition)]
        self.offsets[(topic, partition)] = off + 1
        msg = SimpleNamespace(topic=topic, partition=partition, offset=off)
        return SimpleNamespace(message=msg, key=key, value=value, headers=[])

    def feed(self, clicks: list[Click] | list[bytes], keys: list[bytes] | None = None, drain: bool = True
             ) -> list[tuple[str, bytes | None, bytes | None, int]]:
        """One user-stage batch of these clicks (Click objects keyed by user key, or raw bytes with ``keys``),
        then one IP-stage batch per by-ip partition, then (``drain``) the inputs go idle and the IP stage releases
        what it holds; returns every record both stages sent."""
        evs = []
        for i, c in enumerate(clicks):
            raw = c.to_json() if isinstance(c, Click) else c
            key = c.user_key.encode() if isinstance(c, Click) else (keys[i] if keys else b"k")
            evs.append(self._event(self.t.clicks, key_partition(key, self.s.partitions), key, raw))
        uo: Collector = self.users.out  # type: ignore[assignment]
        io: Collector = self.ips.out  # type: ignore[assignment]
        n0 = len(uo.sent)
        asyncio.run(self.users.run(evs))
        produced = uo.sent[n0:]
        by_ip = [self._event("h.by-ip", p, None, v) for topic, _, v, p in produced if topic == "h.by-ip" and v]
        m0 = len(io.sent)
        for p in sorted({e.message.partition for e in by_ip}):
            asyncio.run(self.ips.run([e for e in by_ip if e.message.partition == p]))
        # nothing more comes: every input goes idle, and the IP stage releases what it holds (in event-time order)
        if drain:
            self.skew += self.s.watermark_idle_s + 1
            asyncio.run(self.ips.run([]))
        out = produced + io.sent[m0:]
        self.out += out
        return out

    def state(self, table: str, key: str) -> dict[str, Any] | None:
        dbs = self.user_dbs if table == "users" else self.ip_dbs
        for db in dbs.values():
            v = db.get(key.encode())
            if v is not None:
                return orjson.loads(v)  # type: ignore[no-any-return]
        return None

    def keys(self, table: str) -> int:
        dbs = self.user_dbs if table == "users" else self.ip_dbs
        return sum(1 for db in dbs.values() for k in db.keys() if not k.startswith(b"__faust"))  # noqa: SIM118

    def decisions(self) -> dict[str, dict[str, Any]]:
        return {k.decode(): orjson.loads(v) for t, k, v, _ in self.out if t == self.t.decisions and k and v}

    def dead_letters(self) -> list[dict[str, Any]]:
        return [orjson.loads(v) for t, _, v, _ in self.out if t == self.t.dead_letters and v]
