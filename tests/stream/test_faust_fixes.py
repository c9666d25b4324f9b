"""The corrected commit-offset rule (stream/faust_fixes.py), on faust's real Consumer methods."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace
from typing import Any, NamedTuple

from intervaltree import IntervalTree

from stream import faust_fixes

faust_fixes.install()
from faust.transport.consumer import Consumer  # noqa: E402  (patched above)

TP = ("by-ip", 0)


class Msg(NamedTuple):
    tp: tuple[str, int]
    offset: int


def consumer(committed: int | None = None) -> Any:
    c = SimpleNamespace(_acked=defaultdict(list), _gap=defaultdict(IntervalTree), _acked_index=defaultdict(set),
                        _committed_offset=defaultdict(lambda: None), _unacked_messages=set(),
                        _on_message_in=lambda *a: None)
    c._committed_offset[TP] = committed
    return c


def ack(c: Any, *offsets: int) -> None:
    for o in offsets:
        c._acked[TP].append(o)
        c._acked_index[TP].add(o)


def deliver(c: Any, *offsets: int) -> None:
    for o in offsets:
        Consumer.track_message(c, Msg(TP, o))


def test_a_single_unacked_head_offset_is_never_committed_past() -> None:
    c = consumer(committed=100)  # next offset to read: 100
    ack(c, 101, 102, 103)  # 100 still waits for its decision (faust 0.15.3 would commit 104 here)
    assert Consumer._new_offset(c, TP) is None
    ack(c, 100)
    assert Consumer._new_offset(c, TP) == 104


def test_without_a_committed_offset_commits_start_at_the_first_delivered() -> None:
    c = consumer(committed=None)
    deliver(c, 5, 6, 7, 8)
    ack(c, 7, 8)  # 5 and 6 not acked yet (faust 0.15.3 would commit 9 here)
    assert Consumer._new_offset(c, TP) is None
    ack(c, 5)
    assert Consumer._new_offset(c, TP) == 6
    assert c._acked[TP] == [7, 8]


def test_nothing_delivered_and_no_commit_means_nothing_to_commit() -> None:
    c = consumer(committed=None)
    ack(c, 3)
    assert Consumer._new_offset(c, TP) is None


def test_broker_gaps_count_as_acked() -> None:
    c = consumer(committed=10)
    c._gap[TP].addi(11, 14)  # offsets 11..13 will never be delivered (compaction / transaction markers)
    ack(c, 10, 14, 15)
    assert Consumer._new_offset(c, TP) == 16


def test_a_seek_restarts_the_first_delivered_offset() -> None:
    c = consumer(committed=None)
    deliver(c, 50)
    import asyncio

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
