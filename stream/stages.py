"""The worker's two stages as objects: each owns its table writer, its clocks, its publisher and one batch step.

``UserStage.step(events)``: clicks (and by-user forwards) -> validate, users table, by-ip records.
``IpStage.step(events)``: by-ip records -> ips table (IPs, and user agent x ad counters per shard of IPs), profiles
(one MGET), one ONNX call, decisions + feature log.

Error policy (what happens when something goes wrong inside a batch):
- a malformed click, a click stamped too far ahead of the worker's clock or too far behind its partition's event
  time (``out_of_time``), a producer's resend, or a click the feature code cannot process: dead-lettered with
  the reason (never raises);
- Redis unreachable or slower than ``redis_timeout_s``: the batch is scored in degraded mode (``ProfileCache``),
  decisions flagged ``degraded``; Redis is retried with backoff;
- anything else that raises in a batch (the model, a send, a fault injected by the tests): the batch is
  all-or-nothing. Its pending table writes and unsent records are dropped and the same events are taken again,
  up to ``stage_retries`` times with backoff; table state already written by a failed attempt holds the clicks'
  first features (``stream.state.apply``), so a retry publishes what the first attempt would have. When every
  attempt failed, ``fail_stop``: the process exits without acking or committing the batch (a restart
  redelivers it). An exception never leaves a stage body: Faust would ack the abandoned batch's events
  (``take_events``' finally) and keep the closure's half-done state for the next one;
- a record batch that Kafka refuses for good: ``fail_stop`` from the send's callback, before Faust's
  pre-commit flush returns (``stream.publish``).
"""

from __future__ import annotations

import asyncio
import base64
import heapq
import logging
import math
import os
import sys
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import orjson

from schemas.events import DeadLetter, SchemaError, decode_click
from slidr.settings import Settings
from slidr.topics import Topics
from stream import faults
from stream import features as F
from stream import metrics as M
from stream.publish import Publisher
from stream.scoring import Model, decision_dicts, score_batch
from stream.state import DUPLICATE_ID, ClickView, Stats, TableWriter, apply

log = logging.getLogger(__name__)
COMBO_PREFIX = "x|"  # ips table keys of (shard of IPs, user agent, ad) states (an IP key never holds "|")
FORWARDED = 1 << 16  # by-ip "p" tag of a click that came through by-user: FORWARDED + its by-user partition
IP_RECORDS_PER_BATCH = 16  # by-ip records scored together at most (each holds one user-stage flush's share)
IP_BATCH_WITHIN_S = 0.002  # longest the IP stage waits for more records before it scores what it has
RECORD_MAX_BYTES = 512 * 1024  # by-ip and feature-log records stay under this (Kafka's default limit is 1 MB)
FAILPOINTS = ("user.begin", "user.write", "user.flush", "ip.begin", "ip.score", "ip.write", "ip.flush")
EXIT_FAIL_STOP = 70
REWIND_EVERY_S = 2.0  # a partition that jumped is sought back at most this often (Stage.in_order)
SEEK_TIMEOUT_S = 10.0  # longest a stage waits for such a seek (the consumer's thread answers it) holding its batch
SWEEP_PER_NEW_KEY = 3.0  # keys the sweep visits per new key a batch adds (see Stage.sweep)
EVICT_IDLE_MS = 3_600_000  # a partition over its key bound loses keys idle for longer than this


def fail_stop(reason: str) -> None:
    """Stop the worker now, committing nothing more: what it was doing is redelivered after a restart. (Faust's
    own crash path shuts down gracefully, which commits acked offsets: the wrong thing here.)"""
    log.critical("worker stopping without committing: %s", reason)
    logging.shutdown()
    sys.stderr.flush()
    os._exit(EXIT_FAIL_STOP)


def ip_partition(ip: str, partitions: int) -> int:
    """The by-ip partition of an IP key (``Click.ip_key``; an internal topic: any stable hash does; crc32 is C,
    murmur2 Python)."""
    return zlib.crc32(ip.encode()) % partitions


def feature_log_record(model_version: str, clicks: Sequence[F.ClickLike], rows: list[list[float]],
                       scores: list[float], degraded: bool = False) -> bytes:
    """One feature-log record: the clicks scored in one batch, their feature rows and scores (docs/design.md)."""
    rec: dict[str, Any] = {"model_version": model_version, "feature_spec_hash": F.FEATURE_SPEC_HASH,
                           "click_ids": [c.click_id for c in clicks], "ts": [c.ts for c in clicks],
                           "features": rows, "scores": scores}
    if degraded:
        rec["degraded"] = True
    return orjson.dumps(rec)


def read_feature_log(value: bytes) -> list[dict[str, Any]]:
    """The per-click rows of one feature-log record: click_id, ts, model_version, feature_spec_hash, features,
    score, degraded."""
    r = orjson.loads(value)
    deg = bool(r.get("degraded", False))
    return [{"click_id": cid, "ts": ts, "model_version": r["model_version"],
             "feature_spec_hash": r["feature_spec_hash"], "features": row, "score": sc, "degraded": deg}
            for cid, ts, row, sc in zip(r["click_ids"], r["ts"], r["features"], r["scores"], strict=True)]


def _chunks(items: list[bytes], max_bytes: int) -> list[list[bytes]]:
    """Consecutive runs of items whose record ``[a,b,...]`` (brackets and commas included) is at most
    ``max_bytes`` long (an item alone may exceed it)."""
    out: list[list[bytes]] = []
    cur: list[bytes] = []
    size = 1  # the record's length: "[" + items with a "," or the closing "]" after each
    for it in items:
        if cur and size + len(it) + 1 > max_bytes:
            out.append(cur)
            cur, size = [], 1
        cur.append(it)
        size += len(it) + 1
    if cur:
        out.append(cur)
    return out


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


class _Held(NamedTuple):
    """A click the IP stage holds until the watermark passes it."""

    c: Any  # ClickView
    rec: Any  # the forwarded record ({"c", "u", "p"})
    tag: int  # its input (a clicks partition, or FORWARDED + a by-user partition)
    off: int  # its offset there (the IP state's dedupe position)
    msg: Any  # the by-ip message it came in
    at: float  # when it came (the stage's wall clock)


class ConsumerOps:
    """What a stage asks of the consumer (``stream/app.py`` binds Faust's; tests use this no-op one)."""

    def do_not_count(self, message: Any) -> None:
        """The message will be acked without having been handled: its ack must not let a commit pass it."""

    async def seek(self, topic: str, partition: int, offset: int) -> bool | None:
        """Fetch the partition again from ``offset`` (False: it is not assigned to this consumer)."""
        return None

    def committed(self, topic: str, partition: int) -> int | None:
        """The group's committed offset of the partition as the consumer knows it (None: unknown)."""
        return None

    def count(self, message: Any) -> None:
        """A message acked earlier without counting (``do_not_count``) is handled now: count its ack."""

    def current(self, message: Any) -> bool:
        """Whether the message was fetched under the consumer's current assignment (not before a rebalance)."""
        return True

    def start(self, topic: str, partition: int) -> int | None:
        """Where the partition's delivery starts after the consumer's last rebalance: its committed offset, or the
        log's start when nothing is committed (None: unknown; the stage then takes the first offset it sees)."""
        return None

    def held_since(self, topic: str, partition: int) -> int | None:
        """The group generation since which this consumer has held the partition without a break (None:
        unknown; a committed offset past what the stage handled is then taken for another worker's)."""
        return None

    def generation(self) -> int | None:
        """The consumer's current group generation (None: unknown)."""
        return None

    def active(self) -> bool:
        """Whether the consumer's flow is on (False in a rebalance's revoke phase, a table recovery, a stop: the
        partitions may be someone else's by the time anything done now lands)."""
        return True


class Stage:
    """What both stages share: a publisher, a table writer and the retry loop around one batch step."""

    name = "stage"

    def __init__(self, s: Settings, topics: Topics, writer: TableWriter, producer: Callable[[], Any],
                 consumer: ConsumerOps | None = None) -> None:
        self.s = s
        self.t = topics
        self.writer = writer
        self.out = Publisher(producer, lambda topic: 1 if topic == topics.dead_letters else s.partitions,
                             on_failure=fail_stop)
        self.consumer = consumer or ConsumerOps()
        self.stats = Stats()
        self.batches = 0
        self.failed_attempts = 0
        self._over_logged = 0.0
        self.next_offset: dict[tuple[str, int], int] = {}  # input partition -> the offset this stage expects next
        self.next_gen: dict[tuple[str, int], int | None] = {}  # ... and the group generation it was handled in
        self.adopted = 0  # committed offsets taken for another worker's progress
        self.committed_past = 0  # committed offsets found past clicks this stage never handled (a bug: see in_order)
        self._past_logged: set[tuple[str, int, int]] = set()
        # input topics only our own non-transactional producer writes: their offsets have no gaps at all
        self.gapless: frozenset[str] = frozenset()
        self.rewinding: dict[tuple[str, int, int], tuple[float, float]] = {}  # (first, last) seek per jump
        self.rewinds = 0
        self.lock = asyncio.Lock()
        self.batch_since: float | None = None  # when the batch in progress began (None: none)

    def in_order(self, events: list[Any]) -> tuple[list[Any], list[tuple[str, int, int]]]:
        """The events this stage may handle now, and the partitions to fetch again from where.

        Around a rebalance Faust can drop fetched messages (skipped as of an older generation, or cleared from a
        stream's buffer) while the fetcher goes on: the stage would then see a later offset first, count it, and
        take the earlier clicks for copies when they come again (their keys' states hold a later position), so
        they would be committed undecided. An event past the offset this stage expects (on the clicks topic,
        more than one offset ahead: a producer's transaction ends in a control record the consumer never sees; on
        our own repartition topics, ``gapless``, any offset ahead: one by-ip record dropped there would otherwise
        pass unseen with all its clicks) is not handled and not counted as acked (``faust_fixes.do_not_count``);
        its partition is fetched again from the expected offset (once per offset every few seconds: the events
        already fetched behind the jump keep coming first). It waits for that offset however long it takes, and
        says so every minute: letting a jump through would lose the clicks in it.

        A partition's first event in this process is held to the same rule: it must be where the consumer's
        delivery starts (``ConsumerOps.start``: the committed offset, or the log's start when nothing is
        committed). Taking a later offset as the first would have the earlier clicks, when fetched again, taken
        for copies of the later ones and never decided (a five-SIGKILL run lost clicks so, the worker idle and
        caught up)."""
        keep: list[Any] = []
        rewind: dict[tuple[str, int], int] = {}
        expect = dict(self.next_offset)
        for ev in events:
            m = ev.message
            tp = (m.topic, m.partition)
            nxt = expect.get(tp)
            if nxt is None:  # the partition's first event here: it must come from where delivery starts
                nxt = self.consumer.start(m.topic, m.partition)  # (None: unknown, taken as it comes)
                if nxt is not None:
                    expect[tp] = nxt
            slack = 0 if m.topic in self.gapless else 1  # one offset: a producer transaction's control record
            if nxt is not None and tp not in rewind and m.offset > nxt + slack:
                committed = self.consumer.committed(m.topic, m.partition)
                if committed is not None and committed > nxt and self._adopt(tp, nxt, committed):
                    nxt = expect[tp] = committed
            if tp in rewind or (nxt is not None and m.offset > nxt + slack):
                if tp not in rewind:
                    rewind[tp] = nxt  # type: ignore[assignment]
                self.consumer.do_not_count(m)
                continue
            expect[tp] = m.offset + 1
            keep.append(ev)
        return keep, [(t, p, o) for (t, p), o in rewind.items()]

    def _adopt(self, tp: tuple[str, int], nxt: int, committed: int) -> bool:
        """Whether a committed offset past the one this stage expects is another worker's progress (the partition
        was someone else's meanwhile: adopt it). If this consumer has held the partition without a break since
        the stage handled the offset before ``nxt``, the commit is its own and passed clicks no stage handled
        (the commit rule was broken: the cause of lost decisions in issue 12): they are not adopted but fetched
        again (they are still in the log), logged as an error and counted (``slidr_commit_past_unhandled_total``)."""
        since = self.consumer.held_since(*tp)
        gen = self.next_gen.get(tp)
        if since is None or gen is None or gen < since:
            self.adopted += 1
            log.info("%s: %s[%d] resumes at the group's committed offset %d, past %d (handled elsewhere)",
                     self.name, tp[0], tp[1], committed, nxt)
            return True
        key = (tp[0], tp[1], committed)
        if key not in self._past_logged:
            self._past_logged.add(key)
            self.committed_past += 1
            M.COMMIT_PAST_UNHANDLED.labels(self.name).inc()
            log.error("%s: %s[%d] has offset %d committed by this worker (holding it since generation %d) although "
                      "this stage handled it only up to %d: fetching the %d clicks in between again, never "
                      "skipping them", self.name, tp[0], tp[1], committed, since, nxt, committed - nxt)
        return False

    async def run(self, events: list[Any]) -> None:
        """One batch, all or nothing, retried (see the module doc). Never raises."""
        async with self.lock:  # the agent's batches and the IP stage's timer (``tick``) take turns
            self.batch_since = time.monotonic()  # (the health verdict: a batch that never ends is stuck)
            try:
                await self._run(events)
            finally:
                self.batch_since = None

    def intake(self, events: list[Any]) -> None:
        """Take what the events bring before the batch step (once, not retried; the IP stage holds clicks)."""

    def due(self) -> bool:
        """Whether a batch without new events has work (the IP stage: held clicks to release)."""
        return False

    async def tick(self) -> None:
        """A batch without new events (the worker's timer): seeks that are due again, held clicks that may go.
        Nothing while the consumer's flow is off: in a rebalance's revoke phase the IP stage would decide held
        clicks and write their state into a partition that may be another worker's a moment later (which then
        decides them again: its commit stays behind them)."""
        if self.consumer.active():
            await self.run([])

    async def _run(self, events: list[Any]) -> None:
        events, rewind = self.in_order(events)
        # new jumps, and partitions still awaited since an earlier one (sought again every few seconds, also
        # when no event of theirs comes: the fetch from the sought offset may never have started)
        for key in list(self.rewinding):
            if key not in rewind:
                rewind.append(key)
        now = time.monotonic()
        for topic, p, off in rewind:
            key = (topic, p, off)
            first, last = self.rewinding.get(key, (now, 0.0))
            if now - last >= REWIND_EVERY_S:
                self.rewinding[key] = (first, now)
                self.rewinds += 1
                if last == 0.0 or int((now - first) // 60) > int((last - first) // 60):
                    log.warning("%s: %s[%d] jumped past offset %d (messages dropped around a rebalance): fetching "
                                "it again (waiting for it for %.0f s)", self.name, topic, p, off, now - first)
                try:  # bounded: a stage that held its batch while the consumer's thread waited for that batch
                    # (a rebalance waits for in-flight events) would never finish either
                    ours = await asyncio.wait_for(self.consumer.seek(topic, p, off), SEEK_TIMEOUT_S)
                except Exception as e:  # never escape (sought again in a few seconds)
                    log.warning("%s: seeking %s[%d] to %d failed: %r", self.name, topic, p, off, e)
                    continue
                if ours is False:  # not assigned to us any more: its new owner reads it from the committed offset
                    log.warning("%s: %s[%d] was revoked while awaited at offset %d", self.name, topic, p, off)
                    del self.rewinding[key]
        try:
            self.intake(events)
        except Exception as e:  # (intake dead-letters what it cannot read; this is a bug: stop, never escape)
            fail_stop(f"{self.name}: taking {len(events)} events failed: {e!r}")
        if not events and not self.due():
            return
        for attempt in range(1, self.s.stage_retries + 1):
            t0 = time.perf_counter()
            try:
                await self.step(events)
                self.batches += 1
                for ev in events:
                    m = ev.message
                    self.next_offset[(m.topic, m.partition)] = m.offset + 1
                    self.next_gen[(m.topic, m.partition)] = getattr(m, "generation_id", None)
                    if self.rewinding:
                        self.rewinding.pop((m.topic, m.partition, m.offset), None)
                M.BATCH_SECONDS.labels(self.name).observe(time.perf_counter() - t0)
                M.BATCH_SIZE.labels(self.name).observe(len(events))
                return
            except Exception as e:  # the policy: drop, retry, then stop (never escape)
                self.writer.discard()
                self.out.discard()
                self.failed_attempts += 1
                M.FAILED_BATCHES.labels(self.name).inc()
                if attempt == self.s.stage_retries:
                    fail_stop(f"{self.name} batch of {len(events)} events failed {attempt} times, last: {e!r}")
                log.warning("%s: batch of %d events failed (attempt %d of %d): %r; taking it again",
                            self.name, len(events), attempt, self.s.stage_retries, e,
                            exc_info=not isinstance(e, faults.InjectedFault))
                await asyncio.sleep(min(0.05 * 2 ** attempt, 5.0))

    async def step(self, events: list[Any]) -> None:
        raise NotImplementedError

    def sweep(self, partition: int, now_ms: int, clicks: int, new_keys: int) -> None:
        """Expire idle keys of a partition this batch handled (``clicks`` of it, ``new_keys`` new there). The
        budget follows the churn: ``sweep_keys_per_click`` per click, and ``SWEEP_PER_NEW_KEY`` per new key, so
        deletions keep up however many clicks bring a new key (the table stays under about 1.5x the keys alive
        in the last TTL + grace: each key is visited at least once per 1/3 of the time it takes to fill that
        many). Over ``max_keys_per_partition``, four times the budget, and visited keys idle for more than
        ``EVICT_IDLE_MS`` are evicted early (counted, logged)."""
        budget = math.ceil(clicks * self.s.sweep_keys_per_click + new_keys * SWEEP_PER_NEW_KEY)
        if self.s.sweep_keys_per_click <= 0:
            return
        evict = None
        if self.writer.keys(partition) > self.s.max_keys_per_partition:
            budget *= 4
            evict = now_ms - EVICT_IDLE_MS
            t = time.monotonic()
            if t - self._over_logged > 60:
                self._over_logged = t
                log.warning("%s: partition %d holds %d keys, over max_keys_per_partition %d: evicting keys idle "
                            "for more than %d min (%d evicted so far)", self.name, partition,
                            self.writer.keys(partition), self.s.max_keys_per_partition, EVICT_IDLE_MS // 60_000,
                            self.writer.evicted)
        self.writer.sweep(partition, now_ms, budget, evict)

    async def commit_batch(self) -> None:
        """The end of every batch, in this order (``stream/state.py``'s module doc says why):
        1. the batch's outputs (by-ip records / decisions, feature log, dead letters) handed to the producer and
           acknowledged by Kafka (a send that fails raises here: the batch is taken again, then the worker stops);
        2. its table changes into the local store (one RocksDB write batch per partition) and their changelog
           records to the producer, not awaited; their offsets are recorded as persisted once acknowledged.
        Faust then acks the batch's events (the take_events loop) and flushes the producer before it commits
        them, so no offset is committed before everything the batch caused is in Kafka."""
        faults.hit(f"{self.name}.flush")
        sent = await self.out.flush()
        if sent:
            await asyncio.gather(*(fut for _, _, _, fut in sent))
        faults.hit(f"{self.name}.write")
        self.writer.write(self.out)
        self.writer.persisted(await self.out.flush())

    def dead_letter(self, msg: Any, raw: bytes, field: str, reason: str) -> None:
        dl = DeadLetter(source_topic=msg.topic, partition=msg.partition, offset=msg.offset, field=field,
                        error=reason[:512], raw_b64=_b64(raw), received_at=int(time.time() * 1000))
        self.out.add(self.t.dead_letters, None, dl.to_json(), partition=0)


class UserStage(Stage):
    """Clicks -> users table -> one by-ip record per IP partition (and record size bound)."""

    name = "user"

    def __init__(self, s: Settings, topics: Topics, writer: TableWriter, producer: Callable[[], Any],
                 by_user: str, by_ip: str, consumer: ConsumerOps | None = None) -> None:
        super().__init__(s, topics, writer, producer, consumer)
        self.by_user = by_user
        self.by_ip = by_ip
        self.gapless = frozenset({by_user})
        self.clock: dict[int, int] = {}  # clicks partition -> latest event time seen there (the sweeps' clock)
        self.beat: dict[int, int] = {}  # input tag (see FORWARDED) -> latest event time forwarded from it
        self.dead = 0
        self.now_ms = int(time.time() * 1000)
        self.skew_ms = int(s.max_future_skew_s * 1000)
        self.late_ms = F.TTL_MS + int(s.max_lateness_s * 1000)

    def out_of_time(self, ts: int, partition_clock: int) -> str:
        """Why a click's event time is refused ('' when it is not): too far ahead of the worker's clock, or too
        far behind its partition's newest event time (no clock ever moves on a refused click)."""
        ahead = ts - self.now_ms
        if ahead > self.skew_ms:
            return (f"event time {ts} is {ahead / 1000:.0f} s ahead of the worker's clock "
                    f"(max_future_skew_s {self.s.max_future_skew_s:g})")
        behind = partition_clock - ts
        if behind > self.late_ms:
            return (f"event time {ts} is {behind / 3_600_000:.1f} h behind its partition's newest event time "
                    f"(the longest window, 24 h, + max_lateness_s {self.s.max_lateness_s:g})")
        return ""

    async def step(self, events: list[Any]) -> None:
        faults.hit("user.begin")
        fwd: dict[int, list[bytes]] = {}
        clock = dict(self.clock)
        beat = dict(self.beat)
        dead = 0
        self.now_ms = int(time.time() * 1000)  # the event-time guard's clock, once per batch
        for event in events:
            dead += self.event(event, fwd, clock, beat)
        per_partition = Counter(ev.message.partition for ev in events if ev.message.topic == self.t.clicks)
        new = self.writer.new_keys()
        for p, n in per_partition.items():  # ours until these events are acked
            self.sweep(p, clock.get(p, 0), n, new.get(p, 0))
        moved = sorted(tag for tag, ts in beat.items() if ts != self.beat.get(tag))
        if moved and self.s.ip_watermark:  # every by-ip partition learns how far each input has come (after
            hb = b'{"w":' + orjson.dumps([[tag, beat[tag]] for tag in moved]) + b"}"  # the clicks it covers)
            for q in range(self.s.partitions):
                fwd.setdefault(q, []).append(hb)
        for p, items in fwd.items():
            for chunk in _chunks(items, RECORD_MAX_BYTES):
                self.out.add(self.by_ip, None, b"[" + b",".join(chunk) + b"]", partition=p)
        await self.commit_batch()
        self.clock = clock
        self.beat = beat
        self.dead += dead
        M.CLICKS.labels("user").inc(len(events))
        if dead:
            M.DEAD_LETTERS.labels("user").inc(dead)

    def event(self, event: Any, fwd: dict[int, list[bytes]], clock: dict[int, int], beat: dict[int, int]) -> int:
        """One click: validate, update its user's state, add it to the record bound for its IP's partition
        (``beat``: the newest event time forwarded per input, for the IP stage's watermark). Returns the number
        of dead letters it caused (0 or 1)."""
        msg = event.message
        raw: bytes = event.value
        try:
            if msg.topic == self.by_user:  # forwarded below: validated already, src in its header
                c: Any = ClickView(orjson.loads(raw))
                sp, so = _src(event)  # its clicks position, tagged apart from the direct clicks'
                tag = FORWARDED + msg.partition
                src = (FORWARDED + sp, so)
            else:
                try:
                    c = decode_click(raw)
                except SchemaError as e:
                    self.dead_letter(msg, raw, e.field, e.reason)
                    return 1
                late = self.out_of_time(c.ts, clock.get(msg.partition, 0))
                if late:
                    self.dead_letter(msg, raw, "ts", late)
                    return 1
                if event.key != c.user_key.encode():  # foreign producer: repartition by user key first
                    self.out.add(self.by_user, c.user_key.encode(), raw,
                                 headers=[("src", f"{msg.partition},{msg.offset}".encode())])
                    return 0
                tag = msg.partition
                src = (msg.partition, msg.offset)
            out = apply(self.writer, msg.partition, event.key, c, src, F.update_user, self.stats, check_id=True)
            if out is DUPLICATE_ID:
                self.dead_letter(msg, raw, "click_id", "duplicate: this user key had a click with this id "
                                 "(decided already; a resend is not counted)")
                return 1
        except Exception as e:  # a click our code cannot handle must not stop the others
            log.exception("user stage: click at %s[%d]@%d could not be processed", msg.topic, msg.partition,
                          msg.offset)
            self.dead_letter(msg, raw, "worker", f"processing failed: {e!r}")
            return 1
        if tag < FORWARDED and c.ts > clock.get(msg.partition, 0):
            clock[msg.partition] = c.ts
        if c.ts > beat.get(tag, 0):
            beat[tag] = c.ts
        if out is not None:  # forward the click with the position of what this stage read (the next stage's
            # dedupe key: a by-user offset for a forwarded click, since forwarded clicks of one clicks partition
            # reach an IP through several by-user partitions, out of their clicks order)
            # (and ``"o"``, a forwarded click's clicks position: what a replay matches clicks by)
            fwd.setdefault(ip_partition(c.ip_key, self.s.partitions), []).append(
                b'{"c":' + raw + b',"u":' + orjson.dumps(out) + b',"p":[' + str(tag).encode() + b","
                + str(msg.offset).encode() + b"]"
                + (b',"o":[' + str(src[0] - FORWARDED).encode() + b"," + str(src[1]).encode() + b"]"
                   if tag >= FORWARDED else b"") + b"}")
        return 0


def _src(event: Any) -> tuple[int, int]:
    """Position of a click read from the clicks topic: the user stage's dedupe key (via the message header)."""
    h = dict(event.headers or {}).get("src")
    if h is None:
        raise ValueError("a by-user message without its src header")
    p, o = h.split(b",")
    return int(p), int(o)


class ProfileCache:
    """The Redis profile cache as the IP stage reads it: one MGET per batch, with a timeout; when Redis fails,
    ``mget`` answers None (the caller scores in degraded mode) and Redis is left alone for a backoff that
    doubles per failure (0.5 s up to 10 s) before it is tried again."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.redis: Any = None
        self.retry_at = 0.0
        self.backoff = 0.5
        self.down_since: float | None = None
        self.failures = 0
        self.degraded_batches = 0

    async def mget(self, keys: list[str]) -> list[Any] | None:
        now = time.monotonic()
        if now < self.retry_at:
            return None
        try:
            if self.redis is None:
                import redis.asyncio as aioredis

                t = self.s.redis_timeout_s
                self.redis = aioredis.from_url(self.s.redis_url, socket_timeout=t, socket_connect_timeout=t,
                                               **self.s.redis_kwargs())
            if keys:
                vals: list[Any] = await asyncio.wait_for(self.redis.mget(keys), self.s.redis_timeout_s)
            else:
                await asyncio.wait_for(self.redis.ping(), self.s.redis_timeout_s)
                vals = []
        except Exception as e:  # redis errors, OSError, timeouts: all mean "no profiles now"
            self.failures += 1
            self.retry_at = now + self.backoff
            self.backoff = min(self.backoff * 2, 10.0)
            if self.down_since is None:
                self.down_since = now
                log.warning("profile cache unreachable (%r): scoring in degraded mode (profile features missing, "
                            "decisions flagged degraded) and retrying with backoff", e)
            return None
        self._back(now)
        return vals

    def _back(self, now: float) -> None:
        if self.down_since is not None:
            log.warning("profile cache back after %.1f s (%d failed attempts): degraded mode over",
                        now - self.down_since, self.failures)
            self.down_since = None
            self.backoff = 0.5

    async def probe(self) -> None:
        """While Redis is down, try it once its backoff is over, also when no batch comes (the stage's timer):
        the worker notices, logs and reports (``slidr_profile_cache_up``) that it is back without traffic."""
        now = time.monotonic()
        if self.down_since is None or now < self.retry_at:
            return
        if await self.mget([]) is not None:  # (an MGET of no keys: a round trip, and the same failure path)
            M.REDIS_UP.set(1)


class IpStage(Stage):
    """by-ip records -> ips table (IP states, user agent x ad states: ``combo``) -> profiles -> one ONNX call ->
    decisions + feature log.

    Per-IP features independent of arrival order (``ip_watermark``): a by-ip partition merges the clicks of every
    input partition of the user stage as they arrive, and a lagging one (a restore, a slow worker, a catch-up)
    would have a fast partition's click counted before the earlier clicks it has not delivered yet. So clicks are
    held, per by-ip partition and per input (``"p"`` tag: a clicks partition, or a by-user partition), and
    released in event-time order once the watermark passes them: the lowest of the inputs' clocks, which the
    user stage sends with every flush (``{"w": [[tag, newest event time forwarded], ...]}``, after the clicks
    it covers). Each input's clicks leave in the order they came (the IP state's dedupe needs it), the inputs
    merged by (event time, tag). An input whose clock has not moved for ``watermark_idle_s`` no longer holds the
    others back (a partition without traffic), nor one never heard of after that long; a click held longer than
    ``watermark_max_hold_s``, or beyond ``watermark_max_held`` clicks per partition, is released anyway (counted:
    ``slidr_watermark_forced_total``). A click below the watermark when it comes (late within its own input) is
    released at once. A held click's message is acked without counting (``ConsumerOps.do_not_count``) and counted
    once all its clicks are decided (``ConsumerOps.count``): commits stay behind held clicks, so a crash
    redelivers them. ``tick`` (a timer) releases clicks when no new records come."""

    name = "ip"

    def __init__(self, s: Settings, topics: Topics, writer: TableWriter, producer: Callable[[], Any],
                 by_ip: str, model: Model, consumer: ConsumerOps | None = None) -> None:
        super().__init__(s, topics, writer, producer, consumer)
        self.by_ip = by_ip
        self.gapless = frozenset({by_ip})
        self.model = model
        self.cache = ProfileCache(s)
        self.redis_prefix = s.redis_key_prefix + ":"
        self.clock: dict[int, int] = {}  # by-ip partition -> newest event time released there (sweeps)
        self.decided = 0
        self.degraded = 0
        self.dead = 0
        self.forced = 0
        self._decided: Counter[tuple[str, str, str]] = Counter()  # (slice, valid, version) -> decisions, last batch
        self.now: Callable[[], float] = time.monotonic  # wall clock of the watermark's timeouts (tests move it)
        self.held: dict[int, dict[int, deque[_Held]]] = {}  # by-ip partition -> input tag -> clicks in order
        self.n_held: dict[int, int] = {}
        self.inputs: dict[int, dict[int, list[float]]] = {}  # by-ip partition -> tag -> [clock, when it moved]
        self.first_seen: dict[int, float] = {}
        self.waiting: dict[tuple[str, int, int], list[Any]] = {}  # message -> [message, clicks not released]
        self._bad: list[tuple[Any, bytes, str]] = []  # what intake could not read: dead-lettered by the step
        self.generation: int | None = None  # the consumer's generation when the held clicks were last checked

    # --- intake: hold what comes ------------------------------------------------------------------------
    def intake(self, events: list[Any]) -> None:
        gen = self.consumer.generation()
        if gen != self.generation:
            self.generation = gen
            self.drop_stale()
        now = self.now()
        for event in events:
            msg = event.message
            q = msg.partition
            self.first_seen.setdefault(q, now)
            try:
                recs = orjson.loads(event.value)
                if not isinstance(recs, list):
                    raise ValueError("a by-ip record is a list")
            except Exception as e:
                log.exception("ip stage: by-ip[%d]@%d could not be read", q, msg.offset)
                self._bad.append((msg, bytes(event.value or b""), f"processing failed: {e!r}"))
                continue
            n = 0
            for i, rec in enumerate(recs):
                try:
                    if "w" in rec:
                        self._beat(q, rec["w"], now)
                        continue
                    c = ClickView(rec["c"])
                    tag, off = int(rec["p"][0]), int(rec["p"][1])
                    c.ip_key  # noqa: B018  (a click without a readable IP fails here, not in the step)
                except Exception as e:  # (as in the user stage)
                    log.exception("ip stage: click %d of by-ip[%d]@%d could not be read", i, q, msg.offset)
                    raw = orjson.dumps(rec.get("c") if isinstance(rec, dict) else rec)
                    self._bad.append((msg, raw, f"processing failed: {e!r}"))
                    continue
                self.held.setdefault(q, {}).setdefault(tag, deque()).append(_Held(c, rec, tag, off, msg, now))
                self.n_held[q] = self.n_held.get(q, 0) + 1
                n += 1
            if n:  # (a message fetched again while its first copy is still held: both copies' clicks count)
                w = self.waiting.setdefault((msg.topic, q, msg.offset), [msg, 0])
                w[0] = msg
                w[1] += n

    def drop_stale(self) -> int:
        """Drop the held clicks fetched before the consumer's last rebalance (run when the generation changes):
        their partition may be another worker's now, and is fetched again from the committed offset, which stays
        behind them, if it is still ours. Never decided here (``_decide`` skips them too): they no longer hold
        back or force out the current clicks. Returns how many were dropped."""
        current = self.consumer.current
        dropped = 0
        for q, queues in self.held.items():
            for tag, dq in queues.items():
                keep = deque(h for h in dq if current(h.msg))
                if len(keep) != len(dq):
                    dropped += len(dq) - len(keep)
                    self.n_held[q] -= len(dq) - len(keep)
                    queues[tag] = keep
        for key, (msg, _) in list(self.waiting.items()):
            if not current(msg):
                del self.waiting[key]
        if dropped:
            log.warning("ip stage: dropped %d held clicks fetched before the rebalance (fetched again by whoever "
                        "owns their partitions now)", dropped)
            M.HELD.set(sum(self.n_held.values()))
        return dropped

    def _beat(self, q: int, clocks: Any, now: float) -> None:
        inputs = self.inputs.setdefault(q, {})
        for tag, ts in clocks:
            cur = inputs.get(int(tag))
            if cur is None or ts > cur[0]:
                inputs[int(tag)] = [ts, now]

    def watermark(self, q: int, now: float) -> float:
        """Event time up to which every input of by-ip partition ``q`` has delivered its clicks."""
        if not self.s.ip_watermark:
            return math.inf
        idle = self.s.watermark_idle_s
        inputs = self.inputs.get(q, {})
        if now - self.first_seen.get(q, now) <= idle and any(p not in inputs for p in range(self.s.partitions)):
            return -math.inf  # a clicks partition not heard of yet: wait for it a while
        live = [ts for ts, moved in inputs.values() if now - moved <= idle]
        return min(live) if live else math.inf

    def _release(self, now: float) -> list[tuple[int, _Held]]:
        """Pop the held clicks that may go now, per by-ip partition in (event time, tag) order."""
        out: list[tuple[int, _Held]] = []
        for q, queues in self.held.items():
            if not self.n_held.get(q):
                continue
            w = self.watermark(q, now)
            heads = [(dq[0].c.ts, tag) for tag, dq in queues.items() if dq]
            heapq.heapify(heads)
            while heads:
                ts, tag = heads[0]
                dq = queues[tag]
                h = dq[0]
                if ts > w:
                    if self.n_held[q] <= self.s.watermark_max_held and now - h.at <= self.s.watermark_max_hold_s:
                        break
                    self.forced += 1
                    M.WATERMARK_FORCED.inc()
                dq.popleft()
                self.n_held[q] -= 1
                out.append((q, h))
                if dq:
                    heapq.heapreplace(heads, (dq[0].c.ts, tag))
                else:
                    heapq.heappop(heads)
        return out

    def _unrelease(self, released: list[tuple[int, _Held]]) -> None:
        """Put popped clicks back (a failed attempt): each at the front of its queue, in order."""
        for q, h in reversed(released):
            self.held[q][h.tag].appendleft(h)
            self.n_held[q] += 1

    async def tick(self) -> None:
        async with self.lock:
            await self.cache.probe()
        await super().tick()

    def due(self) -> bool:
        now = self.now()
        for q, queues in self.held.items():
            if not self.n_held.get(q):
                continue
            w = self.watermark(q, now)
            if self.n_held[q] > self.s.watermark_max_held:
                return True
            for dq in queues.values():
                if dq and (dq[0].c.ts <= w or now - dq[0].at > self.s.watermark_max_hold_s):
                    return True
        return False

    # --- the batch step: release, count, score ----------------------------------------------------------
    async def step(self, events: list[Any]) -> None:
        faults.hit("ip.begin")
        released = self._release(self.now())
        try:
            await self._decide(released)
        except BaseException:
            self._unrelease(released)
            raise
        self._bad = []
        done: list[Any] = []
        for _, h in released:
            key = (h.msg.topic, h.msg.partition, h.msg.offset)
            w = self.waiting.get(key)
            if w is not None:
                w[1] -= 1
                if w[1] <= 0:
                    del self.waiting[key]
                    done.append(w[0])
        held_now = {(e.message.topic, e.message.partition, e.message.offset) for e in events}
        for key in held_now & self.waiting.keys():  # acked by Faust after this batch, but not decided yet
            self.consumer.do_not_count(self.waiting[key][0])
        for msg in done:
            if (msg.topic, msg.partition, msg.offset) not in held_now:  # held over from an earlier batch
                self.consumer.count(msg)
        M.HELD.set(sum(self.n_held.values()))

    async def _decide(self, released: list[tuple[int, _Held]]) -> None:
        todo: list[tuple[int, F.ClickLike, Any, list[float], list[float]]] = []
        clock = dict(self.clock)
        dead = 0
        for msg, raw, reason in self._bad:
            self.dead_letter(msg, raw, "worker", reason)
            dead += 1
        counted: Counter[int] = Counter()
        for q, h in released:
            if not self.consumer.current(h.msg):
                continue  # fetched before a rebalance: redelivered (to whoever owns the partition now)
            c = h.c
            try:
                out = apply(self.writer, q, c.ip_key.encode(), c, (h.tag, h.off), F.update_ip, self.stats)
                if out is not None:  # a copy (None) has nothing to decide
                    xf = self.combo(q, c, (h.tag, h.off), h.rec["u"], out)
            except Exception as e:  # (as in the user stage)
                log.exception("ip stage: a click of by-ip[%d]@%d could not be processed", q, h.msg.offset)
                self.dead_letter(h.msg, orjson.dumps(h.rec.get("c")), "worker", f"processing failed: {e!r}")
                dead += 1
                continue
            if out is not None:
                todo.append((q, c, h.rec, out, xf))
                counted[q] += 1
            if c.ts > clock.get(q, 0):
                clock[q] = c.ts
        new = self.writer.new_keys()
        for q, n in counted.items():
            self.sweep(q, clock.get(q, 0), n, new.get(q, 0))  # ours until acked
        decided = degraded = 0
        self._decided = Counter()
        if todo:
            decided, degraded = await self.score(todo)
        await self.commit_batch()
        self.clock = clock
        self.decided += decided
        self.degraded += degraded
        self.dead += dead
        M.CLICKS.labels("ip").inc(len(todo))
        if dead:
            M.DEAD_LETTERS.labels("ip").inc(dead)
        if degraded:
            M.DEGRADED.inc(degraded)
        for (sl, valid, version), n in self._decided.items():
            M.DECISIONS.labels(sl, valid, version).inc(n)
        M.REDIS_UP.set(0 if self.cache.down_since is not None else 1)

    def combo(self, q: int, c: F.ClickLike, src: tuple[int, int], user_feats: list[float],
              ip_feats: list[float]) -> list[float]:
        """The click's (shard of IPs, user agent, ad) features (``features.update_combo``), kept in the ips
        table under ``COMBO_PREFIX`` + ``combo_key``: in the same partition as the click's IP, so the two states
        are written in one RocksDB write batch and one changelog batch (a click the IP state holds, its
        combination's state holds too). A combination state found holding a click its IP state did not (a
        changelog restored from between the two records of a split batch) gives its current features."""
        key = (COMBO_PREFIX + F.combo_key(c)).encode()
        st, xf = F.update_combo(self.writer.get(q, key), c, src, *F.is_new(user_feats, ip_feats))
        self.writer.put(q, key, st)
        return xf

    async def score(self, todo: list[tuple[int, F.ClickLike, Any, list[float], list[float]]]) -> tuple[int, int]:
        """Profiles (one Redis MGET), one ONNX call, a decision per click and feature-log records per by-ip
        partition. ``todo``: (by-ip partition, click, forwarded record, IP features, combination features).
        Returns (decided, decided in degraded mode)."""
        keys: list[str] = []
        for _, c, _, _, _ in todo:
            ck, ik = F.profile_keys(c)
            keys.append(self.redis_prefix + (ck or "-"))
            keys.append(self.redis_prefix + ik)
        model = self.model  # one model per batch (a hot swap replaces self.model between batches)
        vals = await self.cache.mget(keys)  # one round trip per batch; None: Redis unreachable (degraded)
        degraded = vals is None
        cs = [c for _, c, _, _, _ in todo]
        if vals is None:
            self.cache.degraded_batches += 1
            rows = [F.assemble(c, rec["u"], ipf, xf, F.MISSING_PROFILE) for _, c, rec, ipf, xf in todo]
        else:
            rows = [F.assemble(c, rec["u"], ipf, xf, F.profile_from(vals[2 * j], vals[2 * j + 1]))
                    for j, (_, c, rec, ipf, xf) in enumerate(todo)]
        faults.hit("ip.score")
        t0 = time.perf_counter()
        x = np.asarray(rows, dtype=np.float32)
        scores = score_batch(model, x)
        decisions = decision_dicts(model, cs, scores, decided_at=int(time.time() * 1000), degraded=degraded,
                                   features=x)
        M.SCORING_SECONDS.observe(time.perf_counter() - t0)  # reason codes included
        tally: Counter[tuple[str, str, str]] = Counter()
        for c, d in zip(cs, decisions, strict=True):
            self.out.add(self.t.decisions, c.click_id.encode(), orjson.dumps(d))
            tally[(d["slice"], "true" if d["valid"] else "false", model.version)] += 1
        self._decided = tally
        by_partition: dict[int, list[int]] = {}
        for j, (p, _, _, _, _) in enumerate(todo):
            by_partition.setdefault(p, []).append(j)
        for p, js in by_partition.items():
            for rec in self._feature_log(model.version, js, cs, rows, decisions, degraded):
                self.out.add(self.t.feature_log, None, rec, partition=p)
        return len(todo), len(todo) if degraded else 0

    @staticmethod
    def _feature_log(version: str, js: list[int], cs: list[F.ClickLike], rows: list[list[float]],
                     decisions: list[dict[str, Any]], degraded: bool) -> list[bytes]:
        rec = feature_log_record(version, [cs[j] for j in js], [rows[j] for j in js],
                                 [decisions[j]["score"] for j in js], degraded)
        if len(rec) <= RECORD_MAX_BYTES or len(js) == 1:
            return [rec]
        half = len(js) // 2  # too large (a hot IP, one or two partitions): split until every record fits
        return (IpStage._feature_log(version, js[:half], cs, rows, decisions, degraded)
                + IpStage._feature_log(version, js[half:], cs, rows, decisions, degraded))
