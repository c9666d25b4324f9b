"""The stages' pure rules without a broker: redelivery (``stream.state.apply``), the batch retry policy, the
profile cache's degraded mode, record size bounds and fail points."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from slidr.settings import Settings
from slidr.topics import Topics
from stream import faults, stages
from stream import features as F
from stream.publish import Publisher
from stream.state import DUPLICATE_ID, RECENT_IDS, Stats, apply
from tests.stream.helpers import T0, click
from tests.stream.test_app import _writer


def test_a_redelivered_click_is_computed_again_from_the_state_it_saw_or_skipped(tmp_path: Path) -> None:
    """Outputs are acknowledged before the state is written: a batch redelivered before its state write is
    computed again from the same state (the same features); after it, its clicks are copies (None)."""
    cl, _ = _writer(tmp_path)
    stats = Stats()
    cs = [click(i, T0 + 1000 * i, session="s1") for i in range(5)]
    first = [apply(cl, 0, b"s:s1", c, (0, 100 + i), F.update_user, stats) for i, c in enumerate(cs)]
    assert [f[0] for f in first if f] == [1.0, 2.0, 3.0, 4.0, 5.0]  # u_clicks_1m grows
    cl.discard()  # the batch failed (or the worker died) before its state write: nothing of it is in the store
    again = [apply(cl, 0, b"s:s1", c, (0, 100 + i), F.update_user, stats) for i, c in enumerate(cs)]
    assert again == first  # the same features, so the same by-ip records and decisions

    async def write() -> None:  # the state written (after the outputs' acks)
        prod = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1")
        cl.write(Publisher(lambda: prod, lambda topic: 1))
        await prod.stop()

    asyncio.run(write())
    assert [apply(cl, 0, b"s:s1", c, (0, 100 + i), F.update_user, stats) for i, c in enumerate(cs)] == [None] * 5
    assert stats.copies == 5
    st = cl.get(0, b"s:s1")
    assert st is not None and F.user_features(st, cs[0])[0] == 5.0  # (reading it off the state: look-ahead)


def test_a_resend_within_the_window_is_a_duplicate_and_counts_nothing(tmp_path: Path) -> None:
    cl, _ = _writer(tmp_path)
    stats = Stats()
    c = click(1, T0, session="s9")
    apply(cl, 1, b"s:s9", c, (1, 5), F.update_user, stats, check_id=True)
    before = cl.get(1, b"s:s9")
    assert apply(cl, 1, b"s:s9", c, (1, 6), F.update_user, stats, check_id=True) is DUPLICATE_ID
    assert cl.get(1, b"s:s9") == before and stats.duplicate_ids == 1
    for i in range(RECENT_IDS):  # the key clicks on: the first id leaves the window
        apply(cl, 1, b"s:s9", click(10 + i, T0 + i), (1, 7 + i), F.update_user, stats, check_id=True)
    assert apply(cl, 1, b"s:s9", c, (1, 99), F.update_user, stats, check_id=True) not in (None, DUPLICATE_ID)


class _Flaky(stages.Stage):
    name = "flaky"

    def __init__(self, fails: int, tmp_path: Path) -> None:
        writer, _ = _writer(tmp_path)
        super().__init__(Settings(stage_retries=3), Topics("t"), writer, lambda: None)
        self.fails = fails
        self.attempts: list[tuple[int, int]] = []

    async def step(self, events: list[Any]) -> None:
        self.writer.put(0, b"k", {"hi": 1})
        self.out._open[("t.x", 0)] = object()  # a record batch being built
        self.attempts.append((len(self.writer.pending), len(self.out._open)))
        if len(self.attempts) <= self.fails:
            raise faults.InjectedFault("boom")


def test_a_failed_batch_is_dropped_and_taken_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stages.asyncio, "sleep", _no_sleep)
    st = _Flaky(2, tmp_path)
    asyncio.run(st.run(_events(3)))
    assert st.attempts == [(1, 1)] * 3  # each attempt starts from nothing: the failed ones left nothing behind
    assert st.batches == 1 and st.failed_attempts == 2


def test_a_batch_failing_every_attempt_stops_the_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stages.asyncio, "sleep", _no_sleep)
    stopped: list[str] = []

    def fake_stop(reason: str) -> None:
        stopped.append(reason)
        raise SystemExit(70)

    monkeypatch.setattr(stages, "fail_stop", fake_stop)
    st = _Flaky(99, tmp_path)
    with pytest.raises(SystemExit):
        asyncio.run(st.run(_events(1)))
    assert len(st.attempts) == 3 and "failed 3 times" in stopped[0] and "boom" in stopped[0]


async def _no_sleep(_s: float) -> None:
    return None


def _events(n: int, partition: int = 0, start: int = 0) -> list[Any]:
    return [SimpleNamespace(message=SimpleNamespace(topic="t.clicks", partition=partition, offset=start + i))
            for i in range(n)]


class _Ops(stages.ConsumerOps):
    def __init__(self) -> None:
        self.not_counted: list[int] = []
        self.seeks: list[tuple[str, int, int]] = []

    def do_not_count(self, message: Any) -> None:
        self.not_counted.append(message.offset)

    async def seek(self, topic: str, partition: int, offset: int) -> None:
        self.seeks.append((topic, partition, offset))


def test_a_jump_past_unhandled_offsets_is_not_handled_and_fetched_again(tmp_path: Path) -> None:
    """Around a rebalance Faust can drop fetched messages while the fetcher goes on: the stage handles nothing
    past the offset it expects, keeps those acks from counting, and fetches the partition again from there (a
    five-SIGKILL run committed 2,199 clicks undecided without this: their keys' states already held later ones)."""
    st = _Flaky(0, tmp_path)
    ops = st.consumer = _Ops()
    asyncio.run(st.run(_events(5)))  # offsets 0..4
    assert st.next_offset[("t.clicks", 0)] == 5 and len(st.attempts) == 1
    asyncio.run(st.run(_events(3, start=40) + _events(2, partition=1)))  # 5..39 never came
    assert ops.not_counted == [40, 41, 42] and ops.seeks == [("t.clicks", 0, 5)]
    assert len(st.attempts) == 2 and st.next_offset[("t.clicks", 1)] == 2  # partition 1 went on
    asyncio.run(st.run(_events(2, start=43)))  # more of what was fetched behind the jump: still not handled
    assert ops.not_counted == [40, 41, 42, 43, 44] and ops.seeks == [("t.clicks", 0, 5)]  # (one seek per 2 s)
    asyncio.run(st.run(_events(36, start=5)))  # fetched again from 5
    assert st.next_offset[("t.clicks", 0)] == 41 and len(st.attempts) == 3 and not st.rewinding
    asyncio.run(st.run(_events(2, start=3)))  # a rewind (a seek back to the committed offset) is handled
    assert st.next_offset[("t.clicks", 0)] == 5
    asyncio.run(st.run(_events(1, start=6)))  # one offset ahead on clicks: a transaction's control record
    assert st.next_offset[("t.clicks", 0)] == 7 and ops.seeks == [("t.clicks", 0, 5)]
    st.gapless = frozenset({"t.clicks"})  # as on our own repartition topics: one offset ahead is a record lost
    asyncio.run(st.run(_events(1, start=8)))
    assert st.next_offset[("t.clicks", 0)] == 7 and ops.seeks[-1] == ("t.clicks", 0, 7) and ops.not_counted[-1] == 8


def test_a_committed_offset_past_the_stage_is_adopted_only_if_another_worker_held_the_partition(
        tmp_path: Path) -> None:
    """After a rebalance the group's committed offset can be past what the stage handled: another worker decided
    those clicks, and the stage goes on from there. But if this consumer held the partition all along, its own
    commit passed clicks no stage handled (issue 12's lost decisions): those are fetched again, never skipped."""
    held = {"since": 3}

    class Ops(_Ops):
        def committed(self, topic: str, partition: int) -> int | None:
            return 20

        def held_since(self, topic: str, partition: int) -> int | None:
            return held["since"]

    def gen(events: list[Any], g: int) -> list[Any]:
        for ev in events:
            ev.message.generation_id = g
        return events

    st = _Flaky(0, tmp_path)
    ops = st.consumer = Ops()
    asyncio.run(st.run(gen(_events(5), 4)))  # 0..4 handled in generation 4, the partition ours since 3
    asyncio.run(st.run(gen(_events(3, start=20), 4)))  # the commit says 20: our own, past 5..19
    assert st.committed_past == 1 and st.adopted == 0
    assert ops.not_counted == [20, 21, 22] and ops.seeks == [("t.clicks", 0, 5)]
    assert st.next_offset[("t.clicks", 0)] == 5
    asyncio.run(st.run(gen(_events(18, start=5), 4)))  # fetched again: all handled
    assert st.next_offset[("t.clicks", 0)] == 23 and not st.rewinding

    st2 = _Flaky(0, tmp_path / "2")
    ops2 = st2.consumer = Ops()
    asyncio.run(st2.run(gen(_events(5), 4)))
    held["since"] = 6  # the partition was another worker's in generation 5: its commit is its progress
    asyncio.run(st2.run(gen(_events(3, start=20), 6)))
    assert st2.adopted == 1 and st2.committed_past == 0 and ops2.seeks == [] and ops2.not_counted == []
    assert st2.next_offset[("t.clicks", 0)] == 23


def test_a_partition_s_first_event_must_be_where_delivery_starts(tmp_path: Path) -> None:
    """A fresh process (a restart) knows no offset yet: a first event past where the consumer's delivery starts
    (the committed offset, or the log's start) is a jump too. Taken as the first, the clicks before it would be
    copies of it when fetched again (their keys' states hold a later position) and never decided."""

    class Ops(_Ops):
        def start(self, topic: str, partition: int) -> int | None:
            return {0: 289, 1: None}[partition]

    st = _Flaky(0, tmp_path)
    ops = st.consumer = Ops()
    asyncio.run(st.run(_events(3, start=400) + _events(2, partition=1, start=70)))
    assert ops.not_counted == [400, 401, 402] and ops.seeks == [("t.clicks", 0, 289)]
    assert ("t.clicks", 0) not in st.next_offset and st.next_offset[("t.clicks", 1)] == 72  # (unknown: as it comes)
    asyncio.run(st.run(_events(114, start=289)))  # fetched again from 289
    assert st.next_offset[("t.clicks", 0)] == 403 and not st.rewinding


def test_an_awaited_partition_is_sought_again_without_events_and_forgotten_once_revoked(tmp_path: Path) -> None:
    """The fetch from a sought offset may never start (the seek did not take): the stage's timer seeks again
    every few seconds although no event of that partition comes (a five-SIGKILL run waited for good once the
    producer had stopped); a partition revoked meanwhile is left to its new owner."""
    st = _Flaky(0, tmp_path)
    ops = st.consumer = _Ops()
    asyncio.run(st.run(_events(5)))
    asyncio.run(st.run(_events(3, start=40)))  # 5..39 never came
    assert ops.seeks == [("t.clicks", 0, 5)]
    asyncio.run(st.tick())  # too soon: one seek every REWIND_EVERY_S
    assert ops.seeks == [("t.clicks", 0, 5)]
    key = ("t.clicks", 0, 5)
    first, last = st.rewinding[key]
    st.rewinding[key] = (first, last - stages.REWIND_EVERY_S)
    asyncio.run(st.tick())  # no events at all: sought again
    assert ops.seeks == [("t.clicks", 0, 5)] * 2 and len(st.attempts) == 1  # (and no batch without events)

    class Revoked(_Ops):
        async def seek(self, topic: str, partition: int, offset: int) -> bool:
            await super().seek(topic, partition, offset)
            return False

    st.consumer = Revoked()
    st.rewinding[key] = (first, last - 2 * stages.REWIND_EVERY_S)
    asyncio.run(st.tick())
    assert not st.rewinding  # not ours any more: nothing awaited


def test_profile_cache_answers_none_when_redis_is_unreachable_and_backs_off() -> None:
    s = Settings(redis_url="redis://127.0.0.1:1/0", redis_timeout_s=0.5)  # nothing listens on port 1

    async def main() -> None:
        pc = stages.ProfileCache(s)
        t0 = time.monotonic()
        assert await pc.mget(["a", "b"]) is None
        assert pc.failures == 1 and pc.down_since is not None and pc.backoff == 1.0
        assert pc.retry_at >= t0 + 0.5  # the next try half a second after the failure at the earliest
        pc.retry_at = time.monotonic() + 60  # (a loaded machine may take longer than that to get to the next call)
        assert await pc.mget(["a"]) is None and pc.failures == 1  # inside the backoff: Redis left alone
        pc.retry_at = 0.0
        assert await pc.mget(["a"]) is None and pc.failures == 2 and pc.backoff == 2.0

    asyncio.run(main())


@pytest.mark.integration
def test_profile_cache_reads_a_live_redis(services: Settings) -> None:
    import redis

    r = redis.Redis.from_url(services.redis_url, **services.redis_kwargs())
    r.set("t-stages:x", b"1")
    try:
        pc = stages.ProfileCache(services)
        assert asyncio.run(pc.mget(["t-stages:x", "t-stages:none"])) == [b"1", None]
    finally:
        r.delete("t-stages:x")


def test_records_are_bounded_by_bytes() -> None:
    items = [b"x" * 1000] * 1500
    chunks = stages._chunks(items, stages.RECORD_MAX_BYTES)
    assert sum(map(len, chunks)) == 1500 and len(chunks) == 3
    assert all(len(b"[" + b",".join(ch) + b"]") <= stages.RECORD_MAX_BYTES for ch in chunks)
    # the brackets count: items that fill the limit exactly with their commas alone go in two records (a run of a
    # maximum-size burst once made a by-ip record one byte over RECORD_MAX_BYTES)
    assert stages._chunks([b"aaaa", b"bbbb"], 10) == [[b"aaaa"], [b"bbbb"]]
    assert stages._chunks([b"aaaa", b"bbb"], 10) == [[b"aaaa", b"bbb"]]  # "[aaaa,bbb]" is 10 bytes
    assert stages._chunks([b"y" * 600_000], 1000) == [[b"y" * 600_000]]  # an item alone is never split


def test_feature_log_records_split_until_they_fit() -> None:
    cs = [click(i, T0 + i) for i in range(4000)]
    rows = [[123456.789] * F.N_FEATURES for _ in cs]
    decs = [{"score": 0.5} for _ in cs]
    recs = stages.IpStage._feature_log("v", list(range(len(cs))), cs, rows, decs, False)
    assert len(recs) > 1 and all(len(r) <= stages.RECORD_MAX_BYTES for r in recs)
    assert [row["click_id"] for r in recs for row in stages.read_feature_log(r)] == [c.click_id for c in cs]


def test_fail_points_raise_at_the_named_hits() -> None:
    pts = faults._parse("ip.score@3,user.flush@2x2")
    assert pts == {"ip.score": [0, 3, 3, 0], "user.flush": [0, 2, 3, 0]}
    assert faults._parse("ip.write@4h") == {"ip.write": [0, 4, 4, 1]}  # hangs (the watchdog's fault test)
    with pytest.raises(ValueError, match="bad item"):
        faults._parse("ip.score")
    old = faults._POINTS
    faults._POINTS = pts
    try:
        raised = []
        for _ in range(5):
            try:
                faults.hit("user.flush")
                raised.append(False)
            except faults.InjectedFault:
                raised.append(True)
        assert raised == [False, True, True, False, False]
        faults.hit("not.named")  # unnamed points never raise
    finally:
        faults._POINTS = old
