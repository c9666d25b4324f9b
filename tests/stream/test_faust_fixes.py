"""The corrected commit-offset rule (stream/faust_fixes.py), on faust's real Consumer methods."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from types import SimpleNamespace
from typing import Any, NamedTuple

import pytest
from intervaltree import IntervalTree

from stream import faust_fixes

faust_fixes.install()
from faust.transport.consumer import Consumer  # noqa: E402  (patched above)
from faust.types import TP as FaustTP  # noqa: E402

TP = FaustTP("by-ip", 0)


class Msg(NamedTuple):
    tp: Any
    offset: int


async def _log_starts(*tps: Any) -> dict[Any, int]:
    return {tp: 0 for tp in tps}


def consumer(committed: int | None = None) -> Any:
    c = SimpleNamespace(_acked=defaultdict(list), _gap=defaultdict(IntervalTree), _acked_index=defaultdict(set),
                        _is_changelog_tp=lambda tp: False, earliest_offsets=_log_starts,
                        _committed_offset=defaultdict(lambda: None), _unacked_messages=set(),
                        _on_message_in=lambda *a: None, _read_offset=defaultdict(lambda: None),
                        assignment=lambda: {TP},
                        app=SimpleNamespace(topics=SimpleNamespace(acks_enabled_for=lambda t: True)))
    c._committed_offset[TP] = committed
    return c


def ack(c: Any, *offsets: int) -> None:
    for o in offsets:
        c._acked[TP].append(o)
        c._acked_index[TP].add(o)


def deliver(c: Any, *offsets: int) -> None:
    """One fetch of these offsets, through the consumer's patched ``_wait_next_records`` (broker answer faked)."""
    async def fetched(self: Any, timeout: float) -> Any:
        return {TP: [Msg(TP, o) for o in offsets]}, None

    orig, faust_fixes._orig_wait_next_records = faust_fixes._orig_wait_next_records, fetched
    try:
        asyncio.run(Consumer._wait_next_records(c, 1.0))
    finally:
        faust_fixes._orig_wait_next_records = orig


def test_a_single_unacked_head_offset_is_never_committed_past() -> None:
    c = consumer(committed=100)  # next offset to read: 100
    ack(c, 101, 102, 103)  # 100 still waits for its decision (faust 0.15.3 would commit 104 here)
    assert Consumer._new_offset(c, TP) is None
    ack(c, 100)
    assert Consumer._new_offset(c, TP) == 104


def test_without_a_committed_offset_commits_start_at_the_first_fetched() -> None:
    c = consumer(committed=None)
    deliver(c, 5, 6, 7, 8)
    ack(c, 7, 8)  # 5 and 6 not acked yet (faust 0.15.3 would commit 9 here)
    assert Consumer._new_offset(c, TP) is None
    ack(c, 5)
    assert Consumer._new_offset(c, TP) == 6
    assert c._acked[TP] == [7, 8]


def test_nothing_fetched_and_no_commit_means_nothing_to_commit() -> None:
    c = consumer(committed=None)
    ack(c, 3)
    assert Consumer._new_offset(c, TP) is None


def test_only_one_offset_gaps_count_as_acked() -> None:
    """A one-offset gap (a transaction's control record) counts as acked; a longer jump in an input topic is
    messages the fetcher skipped around a rebalance, and is never committed past (a five-SIGKILL run lost 2,049
    clicks that way)."""
    c = consumer(committed=10)
    c._gap[TP].addi(11, 12)  # offset 11 will never be delivered
    ack(c, 10, 12, 13)
    assert Consumer._new_offset(c, TP) == 14
    c = consumer(committed=10)
    c._gap[TP].addi(11, 14)  # 11..13 skipped by the fetcher: not handled
    ack(c, 10, 14, 15)
    assert Consumer._new_offset(c, TP) == 11  # only 10 is safe
    c._committed_offset[TP] = 11  # (Faust records the commit)
    assert Consumer._new_offset(c, TP) is None  # and nothing more until 11..13 come again
    ack(c, 11, 12, 13)
    assert Consumer._new_offset(c, TP) == 16


def test_no_gap_counts_on_our_own_repartition_topics() -> None:
    """by-ip holds no control records (our producer is not transactional): a one-offset gap there is one record
    dropped, with all its clicks, and is never committed past."""
    faust_fixes.gapless(TP.topic)
    try:
        c = consumer(committed=10)
        c._gap[TP].addi(11, 12)
        ack(c, 10, 12, 13)
        assert Consumer._new_offset(c, TP) == 11  # only 10
        c._committed_offset[TP] = 11
        assert Consumer._new_offset(c, TP) is None
        ack(c, 11)
        assert Consumer._new_offset(c, TP) == 14
    finally:
        faust_fixes.GAPLESS.discard(TP.topic)


def test_a_seek_restarts_the_first_fetched_offset() -> None:
    c = consumer(committed=None)
    deliver(c, 50)

    async def no_seek(self: Any) -> None:
        return None

    orig, faust_fixes._orig_perform_seek = faust_fixes._orig_perform_seek, no_seek
    try:
        asyncio.run(Consumer.perform_seek(c))
    finally:
        faust_fixes._orig_perform_seek = orig
    deliver(c, 60)
    ack(c, 60)
    assert Consumer._new_offset(c, TP) == 61


def test_a_fetch_from_a_sought_offset_resets_the_read_offset() -> None:
    """The drain loop may hand out the rest of a fetch from before a seek (``perform_seek`` after a rebalance, or
    a rewind) after the seek set the read offset back: each message sets it forward again, and the fetch from the
    sought offset was dropped as read (a partition stalled for good in the five-SIGKILL test)."""
    c = consumer(committed=100)
    c._read_offset[TP] = 180  # the old fetch's last message, handed out after the seek to 100
    deliver(c, 100, 101)  # the fetch from the sought offset
    assert c._read_offset[TP] == 100  # so the drain loop delivers 100 and on
    c._read_offset[TP] = 101
    deliver(c, 102)  # a fetch going on from where the last one ended leaves it alone
    assert c._read_offset[TP] == 101


def test_a_rewind_seeks_in_the_consumer_thread_and_never_raises() -> None:
    c = consumer(committed=100)
    sought: list[dict[Any, int]] = []

    async def seek_wait(partitions: dict[Any, int]) -> None:
        sought.append(partitions)

    c.seek_wait = seek_wait
    assert asyncio.run(faust_fixes.rewind(c, TP, 120))
    assert sought == [{TP: 120}]

    async def revoked(partitions: dict[Any, int]) -> None:
        raise RuntimeError("IllegalStateError: No current assignment for partition")

    c.seek_wait = revoked
    assert not asyncio.run(faust_fixes.rewind(c, TP, 120))  # revoked meanwhile: nothing to do, nothing raised


# --- delivery fast path ----------------------------------------------------------------------------------
def _app() -> Any:
    import faust

    app = faust.App("fixes-test", broker="kafka://127.0.0.1:1", web_enabled=False, stream_buffer_maxsize=4)
    t = app.topic("t", key_type=bytes, value_type=bytes)
    app.topics.add(t)
    return app, t


def test_delivery_can_block_follows_flow_control_and_full_buffers() -> None:
    import asyncio

    async def main() -> None:
        app, t = _app()
        assert faust_fixes.delivery_can_block(app)  # flow control starts suspended (before partitions arrive)
        app.flow_control.resume()
        assert not faust_fixes.delivery_can_block(app)
        for i in range(4):
            t.queue.put_nowait(i)
        assert faust_fixes.delivery_can_block(app)  # a stream buffer is full: a delivery would wait
        t.queue.clear()
        assert not faust_fixes.delivery_can_block(app)
        async with app.topics._tp_to_callback_lock:  # subscriptions being updated
            assert faust_fixes.delivery_can_block(app)

    asyncio.run(main())


def test_wait_first_awaits_a_delivery_directly_only_when_it_cannot_block() -> None:
    import asyncio

    async def main() -> None:
        app, t = _app()
        app.flow_control.resume()
        c = SimpleNamespace(app=app, suspend_flow=asyncio.Event(), _stopped=asyncio.Event(),
                            _crashed=asyncio.Event())
        delivered: list[int] = []

        async def deliver() -> int:
            delivered.append(1)
            return 7

        async def suspend_wait() -> None:
            raise AssertionError("the fast path never starts the suspension wait")

        res = await Consumer.wait_first(c, deliver(), suspend_wait())
        assert res.results == [7] and not res.stopped and delivered == [1]
        # a full stream buffer: Faust's own path (its tasks race the delivery against the suspension)
        for i in range(4):
            t.queue.put_nowait(i)
        called: list[Any] = []

        async def service_wait_first(self: Any, *coros: Any, timeout: Any = None) -> str:
            called.append(coros)
            for co in coros:
                co.close()
            return "faust"

        orig = faust_fixes.Service.wait_first
        faust_fixes.Service.wait_first = service_wait_first  # type: ignore[method-assign]
        try:
            assert await Consumer.wait_first(c, deliver(), suspend_wait()) == "faust"
        finally:
            faust_fixes.Service.wait_first = orig  # type: ignore[method-assign]
        assert len(called) == 1 and delivered == [1]

    asyncio.run(main())


# --- commits through a real stream -----------------------------------------------------------------------
@pytest.mark.integration
def test_a_take_events_agent_commits_every_partition_to_its_end(kenv: Any) -> None:
    """A fresh group (no committed offset yet): the patched consumer must commit what the agent acked. The first
    version of the fix hooked ``track_message``, which Faust's Stream inlines: it committed nothing at all."""
    import subprocess
    import sys

    from tests.stream import kafka_helpers as K

    s = kenv.settings
    topic = kenv.topics.clicks
    asyncio.run(K.produce_raw(s, topic, [(f"k{i}".encode(), b"x") for i in range(4000)]))
    group = f"{kenv.group}-take"
    log = kenv.workdir / "take.log"
    with log.open("wb") as f:
        p = subprocess.Popen([sys.executable, "-m", "tests.stream.take_agent", topic, group],
                             env=K.worker_env(s), stdout=f, stderr=subprocess.STDOUT)
    try:
        got, want = K.wait_committed(s, group, topic, 90.0, alive=lambda: p.poll() is None)
    finally:
        K.stop(p)
    assert len(want) == s.partitions  # 4,000 keys spread over every partition
    assert got == want, log.read_text()[-3000:]
    # the assignment hook ran in the real consumer: each batch's partition is held since its generation
    took = [ln.split() for ln in log.read_text().splitlines() if ln.startswith("took ")]
    assert took and all(w[4] == w[6] != "None" for w in took), took[:3]
    # and where delivery starts was recorded from the broker: a new group's partitions start at the log's start
    assert all(w[8] == "0" for w in took), took[:3]


def test_delivery_starts_at_the_committed_offset_or_the_log_start() -> None:
    """Point 6: after each rebalance's seek, each assigned input partition's start is recorded: its committed
    offset, or the log's start (asked of the broker) when nothing or 0 is committed; changelogs are left out."""
    a, b, ch = FaustTP("clicks", 0), FaustTP("clicks", 1), FaustTP("x-changelog", 0)
    asked: list[Any] = []

    async def earliest_offsets(*tps: Any) -> dict[Any, int]:
        asked.extend(tps)
        return {FaustTP(tp.topic, tp.partition): 12 for tp in tps}

    c = SimpleNamespace(assignment=lambda: {a, b, ch}, _committed_offset={a: 289, b: None},
                        _is_changelog_tp=lambda tp: tp.topic.endswith("changelog"), earliest_offsets=earliest_offsets)
    asyncio.run(faust_fixes._note_starts(c))
    assert asked == [b]
    assert faust_fixes.start_offset(c, "clicks", 0) == 289 and faust_fixes.start_offset(c, "clicks", 1) == 12
    assert faust_fixes.start_offset(c, "x-changelog", 0) is None

    async def broken(*tps: Any) -> dict[Any, int]:
        raise RuntimeError("broker away")

    c.earliest_offsets = broken
    asyncio.run(faust_fixes._note_starts(c))  # logged, never raised: the unknown start is taken as it comes
    assert faust_fixes.start_offset(c, "clicks", 0) == 289 and faust_fixes.start_offset(c, "clicks", 1) is None


def test_a_partition_is_held_since_the_first_of_an_unbroken_run_of_generations() -> None:
    """Point 5: a partition assigned in consecutive generations keeps the generation its run began in; one that
    was not ours in between, or a generation this consumer never saw (someone else may have held it), starts a
    new run. The stages adopt a committed offset past their own only when the run began after they handled it."""
    c = SimpleNamespace()
    a, b = FaustTP("clicks", 0), FaustTP("clicks", 1)
    faust_fixes.note_assignment(c, {a, b}, 3)
    assert faust_fixes.held_since(c, "clicks", 0) == 3 and faust_fixes.held_since(c, "clicks", 1) == 3
    faust_fixes.note_assignment(c, {a}, 4)  # b went to another worker
    assert faust_fixes.held_since(c, "clicks", 0) == 3 and faust_fixes.held_since(c, "clicks", 1) is None
    faust_fixes.note_assignment(c, {a, b}, 5)  # b came back
    assert faust_fixes.held_since(c, "clicks", 0) == 3 and faust_fixes.held_since(c, "clicks", 1) == 5
    faust_fixes.note_assignment(c, {a, b}, 7)  # generation 6 passed this consumer by (session expired)
    assert faust_fixes.held_since(c, "clicks", 0) == 7 and faust_fixes.held_since(c, "clicks", 1) == 7
    assert Consumer.on_partitions_assigned is faust_fixes._on_partitions_assigned


class _AckMsg(SimpleNamespace):
    __hash__ = object.__hash__  # messages live in the consumer's sets


def test_a_message_of_an_earlier_generation_is_never_counted_as_acked() -> None:
    """Faust's Stream acks the messages it skips after a rebalance (fetched under the old generation, fetched again
    after the seek): counted, they let the commit rule commit past clicks not handled yet."""
    c = consumer(committed=100)
    c.app = SimpleNamespace(consumer_generation_id=7, topics=SimpleNamespace(acks_enabled_for=lambda t: True),
                            flow_control=SimpleNamespace(is_active=lambda: True))
    c._n_acked, c._waiting_for_ack = 0, None
    stale = _AckMsg(tp=TP, offset=100, acked=False, generation_id=6, topic="by-ip")
    assert Consumer.ack(c, stale) is False and stale.acked and c._acked[TP] == []
    assert Consumer._new_offset(c, TP) is None  # nothing to commit: 100 is not handled yet
    fresh = _AckMsg(tp=TP, offset=100, acked=False, generation_id=7, topic="by-ip")
    assert Consumer.ack(c, fresh) is True and c._acked[TP] == [100]
    assert Consumer._new_offset(c, TP) == 101


def test_no_ack_counts_while_the_flow_is_suspended() -> None:
    """A rebalance's revoke phase (or a recovery) suspends Faust's flow control before the generation changes: the
    Stream skips what it takes and acks it. Counted, those acks let the periodic commit pass unhandled clicks."""
    active = [False]
    c = consumer(committed=100)
    c.app = SimpleNamespace(consumer_generation_id=7, topics=SimpleNamespace(acks_enabled_for=lambda t: True),
                            flow_control=SimpleNamespace(is_active=lambda: active[0]))
    c._n_acked, c._waiting_for_ack = 0, None
    skipped = _AckMsg(tp=TP, offset=100, acked=False, generation_id=7, topic="by-ip")
    assert Consumer.ack(c, skipped) is False and skipped.acked and c._acked[TP] == []
    assert Consumer._new_offset(c, TP) is None  # 100 is fetched again after the rebalance's seek
    active[0] = True
    again = _AckMsg(tp=TP, offset=100, acked=False, generation_id=7, topic="by-ip")
    assert Consumer.ack(c, again) is True and Consumer._new_offset(c, TP) == 101



def test_the_app_runs_without_faust_s_per_event_monitor_sensor(tmp_path: Any) -> None:
    import faust

    app = faust.App("t-sensors", broker="kafka://127.0.0.1:1", datadir=str(tmp_path), web_enabled=False)
    list(app.on_init_dependencies())
    assert app.monitor not in set(app.sensors)  # (point 4: our metrics are per batch)
    assert app.monitor is not None  # still there for the consumer's direct calls


def test_a_rebalance_has_a_sensor_state_without_the_monitor(tmp_path: Any) -> None:
    import faust

    app = faust.App("t-rebalance", broker="kafka://127.0.0.1:1", datadir=str(tmp_path), web_enabled=False)
    list(app.on_init_dependencies())
    assert app.sensors.on_rebalance_start(app)  # (Faust warns "Missing sensor state" at every rebalance if empty)


def test_commit_lag_counts_messages_read_and_not_committed() -> None:
    """Read offset + 1 less the committed offset (or, with nothing committed, where delivery started); a partition
    with neither known is left out, and a commit past the read offset (a control record) counts 0."""
    a, b, c_, d = FaustTP("clicks", 0), FaustTP("clicks", 1), FaustTP("clicks", 2), FaustTP("clicks", 3)
    c = SimpleNamespace(assignment=lambda: {a, b, c_, d}, _read_offset={a: 99, b: 41, c_: None, d: 7},
                        _committed_offset={a: 100, b: 30, c_: 5, d: None})
    c.__dict__[faust_fixes._START] = {d: 2}
    assert faust_fixes.commit_lag(c) == {a: 0, b: 12, d: 6}  # b: offsets 30..41
    c._read_offset[a] = 120
    c._committed_offset[a] = 122  # (a transaction's control record after the last message read)
    assert faust_fixes.commit_lag(c)[a] == 0


def test_a_raw_topic_hands_the_message_s_own_bytes_to_the_event(tmp_path: Any) -> None:
    import faust
    from faust.types import Message

    app = faust.App("t-raw", broker="kafka://127.0.0.1:1", datadir=str(tmp_path), web_enabled=False)
    topic = faust_fixes.raw_topic(app, "clicks")
    assert isinstance(topic.schema, faust_fixes.RawSchema)  # (point 7: no serializer registry per message)
    decode = topic.schema.compile(app)
    key, value = b"user-1", b'{"click_id":"c1"}'
    m = Message("clicks", 0, 7, 0.0, 0, None, key, value, None)
    ev = asyncio.run(decode(m))
    assert ev.key is key and ev.value is value and ev.message is m
    for k, v in ((None, b"x"), (b"k", None)):  # no key; a tombstone: None, as the raw codec gives
        ev = asyncio.run(decode(Message("clicks", 0, 8, 0.0, 0, None, k, v, None)))
        assert ev.key == k and ev.value == v
