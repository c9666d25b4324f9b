"""Patches to faust-streaming 0.15.3's consumer: corrections to its offset commits (at-least-once safety: which
acked offsets may be committed, and no acks of messages from an earlier group generation, ``_ack``) and a fast
path for delivering a fetched message to the streams (throughput). ``install()`` applies them.

1. Commits.

``Consumer._new_offset`` (faust-streaming 0.15.3) picks the offset to commit from the acked offsets of a
partition. Two flaws let it commit past an offset that was never acked:

1. its head-gap test ``min(acked) - committed > 1`` is off by one: with ``committed`` = the next offset to
   read = 100 and acked = [101, 102], offset 100 is committed past (103 is committed);
2. with no committed offset yet (None; ``perform_seek`` also turns a committed 0 into None) it checks
   nothing, so the first run of acked offsets is committed wherever it starts.

Faust acks some events itself even on ``noack()`` and ``take()`` streams (values it skips around a rebalance),
so a later offset can be acked while an earlier event still waits in the scoring buffer for its decision.
With either flaw, that later offset is committed, and a crash then loses the earlier click (seen once: 19,999
of 20,000 clicks decided after a SIGKILL). The replacement below commits only a run of acked offsets that
starts at the committed offset or, when there is none, at the lowest offset fetched since the partitions
were last assigned (seek); anything else waits. The first fetched offset is recorded where the consumer takes
each fetch (``_wait_next_records``, once per fetch, not per message): ``Consumer.track_message`` would be the
natural hook, but Faust's ``Stream`` inlines it and never calls it (a version of this fix that hooked it never
committed anything on a new group; ``tests/stream/test_faust_fixes.py`` now checks commits through a real
stream and broker).

2. Delivery. ``Consumer._drain_messages`` hands every fetched message to the conductor through
``self.wait_first(callback(message), self.suspend_flow.wait())``: four asyncio tasks and an ``asyncio.wait`` per
message, so that a delivery blocked on a full stream buffer, on paused flow control or on a full producer buffer
can be abandoned when a rebalance suspends the flow. That machinery was 55% of a bare agent's CPU (63 -> 27 us a
message without it, ``bench/faust_bare.py``). ``_wait_first`` below awaits the delivery directly when none of
those can block it: flow not suspended, flow control active, producer buffer under its limit, subscriptions not
being updated and no subscribed topic's buffer full. A delivery that cannot block completes without yielding,
so nothing can suspend the flow while it runs and the outcome is the same. Otherwise it takes Faust's own path.

3. Read offsets after a seek. The drain loop drops a fetched message below the partition's read offset (the
last offset it handed out). A seek sets the read offset back (``perform_seek`` after a rebalance, to the
committed offsets; ``seek``), but the drain loop may still be handing out a fetch from before the seek, and each
message it delivers sets the read offset forward again. The fetch from the sought offset was then dropped as
read already: after a SIGKILL and restart, a partition whose old fetch had reached the end of the log received
nothing at all, and the stage waited for good (the five-SIGKILL fault test stalled that way on two of four
partitions). The fetcher's position only moves back on a seek, so a fetch that starts at or below the read
offset is always one from a sought offset: ``_wait_next_records`` sets the read offset to its first offset, and
the drain loop delivers it (what the seek meant).

4. No per-event Monitor sensor. Faust adds its ``Monitor`` (per-event and per-message counters, rates and
timings for its web ``/stats`` page and its statsd/datadog monitors) to the app's sensors, and every event then
passes through four sensor calls that fill it. We serve our own metrics (``stream/metrics.py``, per batch) and
no Faust web stats: removing it from the sensors took a bare agent from 53-56 to 45-52 us of CPU an event
(``bench/faust_bare.py``, three runs each way, 100,000 clicks). ``app.monitor`` itself stays (Faust's consumer
still calls it directly for end offsets and commits).

5. Who held a partition. ``Consumer.on_partitions_assigned`` records, per partition, the group generation since
which this consumer has held it without a break (assigned in consecutive generations: ``held_since``). A stage
takes a committed offset past the one it expects for another worker's progress only if another worker can have
held the partition meanwhile (``stages.Stage._adopt``).

6. Where delivery starts. After each rebalance's seek (``perform_seek``) ``_note_starts`` records, per assigned
input partition, the offset its delivery starts from: the committed offset, or the log's start offset (asked of
the broker) when nothing or 0 is committed (aiokafka's ``seek_to_committed`` leaves such a partition wherever its
fetcher was). A stage holds a partition's first event to it (``stages.Stage.in_order``, ``start_offset``).

7. Raw bytes without the serializer registry. Every topic here carries bytes (we decode clicks and records
ourselves), yet Faust's ``Schema`` passes each message's key and value through the app's serializer registry
(codec lookup, ``_prepare_payload``, error wrapping): 4.3-4.6 against 2.0-2.2 us a message, measured on the
compiled decode function (issue 21). ``RawSchema`` hands the message's own bytes to the event (None stays None,
as the ``raw`` codec gives). Not a patch: topics opt in (``raw_topic``; the worker's and the bare-agent bench's).
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any

import faust
from faust.app.base import App
from faust.transport.consumer import Consumer
from faust.utils.functional import consecutive_numbers
from mode import Service
from mode.services import WaitResults

log = logging.getLogger(__name__)

_FIRST = "_slidr_first_fetched"  # TP -> lowest offset fetched since the last seek


async def _wait_next_records(self: Any, timeout: float) -> Any:
    records, active = await _orig_wait_next_records(self, timeout)
    if records:
        first: dict[Any, int] = self.__dict__.setdefault(_FIRST, {})
        read = self._read_offset
        for tp, recs in records.items():
            if not recs:
                continue
            o = recs[0].offset  # a fetch is in offset order
            r = read.get(tp)
            if r is not None and o <= r:
                # fetched again from a sought offset (point 3 of the module doc): the drain loop delivers it
                read[tp] = o
            if tp not in first or o < first[tp]:
                first[tp] = o
    return records, active


async def _on_partitions_assigned(self: Any, assigned: Any, generation_id: int = 0) -> None:
    note_assignment(self, assigned, generation_id)
    await _orig_on_partitions_assigned(self, assigned, generation_id)


async def _perform_seek(self: Any) -> None:
    self.__dict__.setdefault(_FIRST, {}).clear()  # a (re)assignment: delivery starts over
    await _orig_perform_seek(self)
    await _note_starts(self)


_START = "_slidr_start"  # TP -> where delivery starts after the last perform_seek (point 6 of the module doc)


async def _note_starts(self: Any) -> None:
    """Record, per assigned input partition, where its delivery starts after this seek: the committed offset, or
    the log's start offset when nothing (or 0) is committed (point 6 of the module doc)."""
    from faust.types import TP

    start: dict[Any, int] = {}
    fresh = []
    for tp in self.assignment():
        if self._is_changelog_tp(tp):
            continue
        committed = self._committed_offset.get(tp)
        if committed is not None:
            start[tp] = int(committed)
        else:
            fresh.append(tp)
    if fresh:
        try:
            for tp, off in (await self.earliest_offsets(*fresh)).items():
                start[TP(tp.topic, tp.partition)] = int(off)
        except Exception as e:  # unknown: the stages take the first offset they see there (as before)
            log.warning("no log start offsets for %d never-committed partitions: %r", len(fresh), e)
    self.__dict__[_START] = start


def start_offset(consumer: Any, topic: str, partition: int) -> int | None:
    """Where the partition's delivery starts after the consumer's last seek (None: unknown)."""
    from faust.types import TP

    return consumer.__dict__.get(_START, {}).get(TP(topic, partition))


GAPLESS: set[str] = set()  # topics whose offsets have no gaps (no control records): see gapless()


def gapless(*topics: str) -> None:
    """Declare topics that only a non-transactional producer writes (the worker's repartition topics): their
    offsets are contiguous, so a gap in what was fetched there is always a message dropped, never acked."""
    GAPLESS.update(topics)


def _new_offset(self: Any, tp: Any) -> int | None:
    acked: list[int] = self._acked[tp]
    if not acked:
        return None
    gaps = self._gap[tp]
    if gaps:
        # Faust records a "gap" wherever the fetched offsets jump forward and counts it as acked (compaction,
        # transaction markers). Our input topics are never compacted, and a jump there means messages the fetcher
        # skipped around a rebalance: counted, they let a commit pass clicks never handled. Only a one-offset gap
        # (a transaction's control record) counts; a longer one is left to be fetched again after the seek.
        # On a topic that only our own non-transactional producer writes (``GAPLESS``) no gap counts at all.
        ranges = sorted(gaps.overlap(0, max(acked)), key=lambda iv: iv.begin)
        if ranges:
            filler = [o for iv in ranges if iv.end - iv.begin == 1 and tp.topic not in GAPLESS
                      for o in range(iv.begin, iv.end)]
            acked.extend(filler)
            gaps.chop(0, max(acked) + 1)
    acked.sort()
    start = self._committed_offset[tp]
    if start is None:
        start = self.__dict__.get(_FIRST, {}).get(tp)
        if start is None:
            return None  # nothing fetched since the seek: nothing is safe to commit
    if acked[0] > start:
        return None  # the next offset to commit has not been acked yet
    batch = next(consecutive_numbers(acked))
    acked[: len(batch)] = []
    self._acked_index[tp].difference_update(batch)
    return int(batch[-1]) + 1


def consumer_lag(consumer: Any) -> dict[Any, int]:
    """Per assigned partition, the messages between the last one read and the partition's end (Faust's
    consumer keeps both: the highwater of the last fetch and the read offset, privately)."""
    out = {}
    for tp in consumer.assignment():
        hw = consumer.highwater(tp)
        read = consumer._read_offset.get(tp)
        if hw is not None:
            out[tp] = max(0, int(hw) - (int(read) + 1 if read is not None else 0))
    return out


def commit_lag(consumer: Any) -> dict[Any, int]:
    """Per assigned partition, the messages read but not committed: the read offset + 1 less the committed offset
    (where delivery started, ``start_offset``, when nothing is committed yet; unknown: left out). It falls to 0
    within a commit interval once the stages have handled what they read; one that stays while no batch completes
    was read and never counted as acked (``stream.health``)."""
    start = consumer.__dict__.get(_START, {})
    out = {}
    for tp in consumer.assignment():
        read = consumer._read_offset.get(tp)
        committed = consumer._committed_offset.get(tp)
        if committed is None:
            committed = start.get(tp)
        if read is not None and committed is not None:
            out[tp] = max(0, int(read) + 1 - int(committed))
    return out


_HELD = "_slidr_held_since"  # TP -> the first generation of its unbroken run of assignments to this consumer
_LAST = "_slidr_last_generation"  # the generation of the last assignment (its TPs are _HELD's keys)


def note_assignment(consumer: Any, assigned: Any, generation: int) -> None:
    """Record an assignment (point 5 of the module doc): a partition assigned in this generation and in the one
    just before keeps the generation its run began in; any other starts a run here (someone else may have held
    it in a generation this consumer did not see)."""
    held: dict[Any, int] = consumer.__dict__.get(_HELD, {})
    last = consumer.__dict__.get(_LAST)
    unbroken = last is not None and generation == last + 1
    consumer.__dict__[_HELD] = {tp: held.get(tp, generation) if unbroken else generation for tp in assigned}
    consumer.__dict__[_LAST] = generation


def held_since(consumer: Any, topic: str, partition: int) -> int | None:
    """The group generation since which this consumer has held the partition without a break (None: not held)."""
    from faust.types import TP

    return consumer.__dict__.get(_HELD, {}).get(TP(topic, partition))


_NOCOUNT = "_slidr_do_not_count"  # messages to be acked without having been handled (stages.Stage.in_order)


def committed_offset(consumer: Any, topic: str, partition: int) -> int | None:
    """The group's committed offset of a partition as this consumer knows it (Faust keeps it privately)."""
    from faust.types import TP

    off = consumer._committed_offset.get(TP(topic, partition))
    return None if off is None else int(off)


async def rewind(consumer: Any, tp: Any, offset: int) -> bool:
    """Read ``tp`` again from ``offset`` (the drain loop delivers that fetch: point 3 of the module doc). The
    seek runs in the consumer's thread, where aiokafka lives (Faust's ``Consumer.seek`` calls it from the event
    loop's thread, and a fetch being collected meanwhile crashed the fetcher with a KeyError once). False when
    the partition is not assigned (any more): whoever owns it now reads it from the committed offset."""
    try:
        await consumer.seek_wait({tp: offset})
    except Exception as e:  # aiokafka's IllegalStateError: revoked meanwhile (a rebalance seeks it anyway)
        log.warning("no rewind of %s to %d: %r", tp, offset, e)
        return False
    return True


def do_not_count(consumer: Any, message: Any) -> None:
    """Make the coming ack of ``message`` not count toward commits (it was not handled; it is fetched again)."""
    consumer.__dict__.setdefault(_NOCOUNT, set()).add(message)


def current(consumer: Any, message: Any) -> bool:
    """Whether ``message`` was fetched under the consumer's current group generation (an older one's are fetched
    again after the rebalance's seek, by whoever owns the partition now)."""
    gen = getattr(message, "generation_id", None)
    return gen is None or gen == consumer.app.consumer_generation_id


def count_ack(consumer: Any, message: Any) -> bool:
    """Count the ack of a message acked earlier without counting (``do_not_count``): a stage that held its
    clicks has handled them now. Not for a message of an earlier generation (see ``_ack``)."""
    if not current(consumer, message):
        return False
    message.acked = False
    return bool(_orig_ack(consumer, message))


def _ack(self: Any, message: Any) -> bool:
    """``Consumer.ack``, but a message fetched under an earlier group generation is never counted as acked. After a
    rebalance Faust's Stream skips such messages (they are fetched again after the seek) and acks them: the acks
    landed in ``_acked`` for offsets at or past the new committed offset, so the commit rule found a run starting
    at the committed offset and committed past clicks the stages had not handled yet; a SIGKILL then lost them
    (637 of 12,000 clicks undecided once in the five-SIGKILL fault test). The skipped message is marked acked (no
    wait on it at shutdown); its offset is committed when its refetched copy is acked.

    Nor is an ack counted while Faust's flow control is suspended (a rebalance's revoke phase, the table recovery,
    a stop): the Stream then skips every event it takes and acks it, and the generation has not changed yet, so
    those acks counted, and the consumer's periodic commit (which runs during the revoke phase) could pass clicks
    no stage handled; after the reassignment the stage saw a jump to the committed offset and took it as another
    worker's progress. A stage's batch that completes meanwhile is not counted either: it is fetched again after
    the rebalance's seek and recognised as copies (redelivery, never loss)."""
    nocount = self.__dict__.get(_NOCOUNT)
    gen = getattr(message, "generation_id", None)
    if ((nocount and message in nocount) or (gen is not None and gen != self.app.consumer_generation_id)
            or not self.app.flow_control.is_active()):
        if nocount:
            nocount.discard(message)
        message.acked = True
        self._unacked_messages.discard(message)
        return False
    return bool(_orig_ack(self, message))


class RawSchema(faust.Schema):
    """A topic's key and value as the message's own bytes (point 7 of the module doc)."""

    def __init__(self) -> None:
        super().__init__(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    def loads_key(self, app: Any, message: Any, *, loads: Any = None, serializer: Any = None) -> Any:
        return message.key

    def loads_value(self, app: Any, message: Any, *, loads: Any = None, serializer: Any = None) -> Any:
        return message.value


def raw_topic(app: Any, *names: str, **kwargs: Any) -> Any:
    """``app.topic`` of raw bytes, decoded without the serializer registry (``RawSchema``)."""
    return app.topic(*names, schema=RawSchema(), **kwargs)


def delivery_can_block(app: Any) -> bool:
    """Whether the conductor's delivery of a message might wait (see the module doc, point 2)."""
    if not app.flow_control.is_active():
        return True
    buf = app.producer.buffer
    if buf.size > buf.max_messages:
        return True
    conductor = app.topics
    if conductor._tp_to_callback_lock.locked():
        return True
    for chan in conductor._topics:
        q = chan._queue  # None until the channel's queue is first used (then empty: not full)
        if q is not None and q.full():
            return True
    return False


async def _wait_first(self: Any, *coros: Any, timeout: Any = None) -> Any:
    # the drain loop's call is the consumer's only one: (delivery coroutine, suspend_flow.wait() coroutine)
    if (len(coros) == 2 and timeout is None and inspect.iscoroutine(coros[0]) and inspect.iscoroutine(coros[1])
            and not self.suspend_flow.is_set() and not self._stopped.is_set() and not self._crashed.is_set()
            and not delivery_can_block(self.app)):
        coros[1].close()  # the flow-suspension wait, never started
        result = await coros[0]
        return WaitResults([coros[0]], [result], False)
    return await Service.wait_first(self, *coros, timeout=timeout)


def _on_init_dependencies(self: Any) -> Any:
    deps = _orig_on_init_dependencies(self)
    self.sensors.remove(self.monitor)  # point 4 of the module doc
    # with no sensor left, a rebalance's sensor state is empty and Faust warned "Missing sensor state for
    # rebalance" at every rebalance: give it a state of its own (no sensor reads it)
    self.sensors.on_rebalance_start = lambda app: {"time_start": time.monotonic()}
    return deps


_orig_wait_next_records = Consumer._wait_next_records
_orig_ack = Consumer.ack
_orig_perform_seek = Consumer.perform_seek
_orig_on_partitions_assigned = Consumer.on_partitions_assigned
_orig_on_init_dependencies = App.on_init_dependencies


def install() -> None:
    """Patch faust's base Consumer (every transport's consumer inherits these methods) and the App's sensors.
    Idempotent."""
    if getattr(Consumer, "_slidr_fixed", False):
        return
    Consumer._wait_next_records = _wait_next_records  # type: ignore[method-assign]
    Consumer.ack = _ack  # type: ignore[method-assign]
    Consumer.perform_seek = _perform_seek  # type: ignore[method-assign]
    Consumer.on_partitions_assigned = _on_partitions_assigned  # type: ignore[method-assign]
    Consumer._new_offset = _new_offset  # type: ignore[method-assign]
    Consumer.wait_first = _wait_first  # type: ignore[method-assign]
    App.on_init_dependencies = _on_init_dependencies  # type: ignore[method-assign]
    Consumer._slidr_fixed = True  # type: ignore[attr-defined]
