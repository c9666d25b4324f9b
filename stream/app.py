"""The Faust app: a per-user stage that forwards batches, and a per-IP stage that scores them.

    <prefix>.clicks (key: user key) --user stage, a batch of clicks at a time: validate, users table-->
        one record per by-ip partition --> <prefix>.by-ip --IP stage, a few records at a time: ips table,
        one Redis MGET, one ONNX call--> <prefix>.decisions (a record per click) + <prefix>.feature-log
        (a record per by-ip partition and batch); malformed clicks -> <prefix>.dead-letters
    a click whose message key is not its user key (a foreign producer) -> <prefix>.by-user (key: user key),
        which the user stage also consumes (it writes the users table only for keys its partition owns)

Why this shape (issue 4: throughput). The worker's cost was per Kafka record and per trip through Faust's and
our code far more than per byte, so the hot path moves few records and works in batches:
- Producers key clicks by user key (``Click.user_key``), so the clicks topic is already partitioned like the
  users table and the user stage reads it directly (no ingest hop).
- The user stage takes up to ``score_batch_size`` clicks or what arrived within ``score_batch_within_s``
  (``take_events``), updates the users table click by click and sends one by-ip record per partition, so the IP
  repartition (a key has one owner) costs one Faust event per batch and partition, not per click. The IP stage
  takes a few by-ip records at a time and scores them together.
- Table writes name their partition: ``TableWriter`` takes each click's own event partition (the user key's;
  every click in a by-ip record hashes to the record's partition, ``ip_partition``), never Faust's current
  event, so writes inside ``take_events`` cannot land in another key's partition (the hazard with table writes
  inside ``take()``). Writes stay in memory until the batch is done, then go out as one RocksDB write batch
  per partition and one changelog record per key (its latest state).
- Records go into aiokafka batches (``stream/publish.py``): no per-record future.
- ``stream/faust_fixes.py`` also skips Faust's four-task hand-off per fetched message when it cannot matter.
- The worker's young-generation GC threshold is raised (``run_worker``).

At-least-once: Faust acks a batch's events, in offset order, only after the batch's body handed everything they
caused (by-ip records, decisions, feature log, table changes) to the producer, and it flushes the producer
before it commits acked offsets (``stream/faust_fixes.py`` corrects which acked offsets it may commit), so no
offset is committed before everything it caused is in Kafka. Redelivered clicks are recognised by their
upstream position (see ``_stage``), so a crash never double counts, and their keys' states are written again,
so a changelog left behind the local store by a crash catches up. Every stage has concurrency 1
(faust-streaming issue 606). The event loop is uvloop when installed, and the worker turns off Faust's terminal
spinner, which set the root logger to DEBUG (a log record built per record sent).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import logging
import math
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import faust
import numpy as np
import orjson
import rocksdict
from faust.types import TP

from schemas.events import Click, ClickKeys, DeadLetter, SchemaError, decode_click
from slidr.settings import Settings
from slidr.topics import Topics, TopicSpec, topic_specs
from stream import faust_fixes
from stream import features as F
from stream.publish import Publisher
from stream.scoring import Model, active_model_dir, decision_dicts, load_model, score_batch

log = logging.getLogger(__name__)
faust_fixes.install()  # never commit past an unacked offset (faust-streaming 0.15.3 can): see the module
USERS_TABLE = "users"
IPS_TABLE = "ips"
FORWARDED = 1 << 16  # by-ip "p" tag of a click that came through by-user: FORWARDED + its by-user partition
IP_RECORDS_PER_BATCH = 16  # by-ip records scored together at most (each holds one user-stage flush's share)
IP_BATCH_WITHIN_S = 0.002  # longest the IP stage waits for more records before it scores what it has
BATCH_MAX = 1 << 16  # most clicks in one by-ip record (settings cap score_batch_size below it)


def internal_topics(s: Settings) -> list[TopicSpec]:
    """The worker's own topics: repartition topics and table changelogs (partitions = the data topics')."""
    p = s.topic_prefix
    n = s.partitions
    compact = (("cleanup.policy", "compact"),)
    return [
        TopicSpec(f"{p}.by-user", n, "clicks of foreign producers repartitioned by user key"),
        TopicSpec(f"{p}.by-ip", n, "clicks + user features repartitioned by IP"),
        TopicSpec(f"{s.worker_id}-{USERS_TABLE}-changelog", n, "users table changelog", compact),
        TopicSpec(f"{s.worker_id}-{IPS_TABLE}-changelog", n, "ips table changelog", compact),
    ]


async def ensure_topics(s: Settings) -> list[str]:
    """Create every topic the worker reads or writes that does not exist yet (idempotent)."""
    from slidr.services import create_topics_async

    return await create_topics_async(s, topic_specs(s) + internal_topics(s))


class ClickView(SimpleNamespace, ClickKeys):
    """An already validated click (a forwarded dict) with Click's attributes, without building a model again
    (``Click.model_construct`` was 5 us a click on the hot path). Fields a producer left out get their
    defaults, as a Click would."""

    def __init__(self, d: dict[str, Any]) -> None:
        super().__init__(**{**_CLICK_DEFAULTS, **d})


_CLICK_DEFAULTS = {k: f.default for k, f in Click.model_fields.items() if not f.is_required()}


def _src(event: Any) -> tuple[int, int]:
    """Position of a click read from the clicks topic: the user stage's dedupe key (via the message header)."""
    h = dict(event.headers or {}).get("src")
    if h is None:
        raise ValueError("a by-user message without its src header")
    p, o = h.split(b",")
    return int(p), int(o)


_MISSING = object()


def _state_hi(v: bytes) -> int:
    """A stored state's newest event time: read from the front of the JSON without parsing it all (states are
    written with "hi" first), else parsed."""
    if v.startswith(b'{"hi":'):
        end = v.find(b",", 6)
        if end > 6 and v[6:end].isdigit():
            return int(v[6:end])
    return int(orjson.loads(v)["hi"])


class TableWriter:
    """A Faust table's writes, kept in memory until ``write`` puts them in the local store (one RocksDB write
    batch per partition) and into a Publisher for the changelog. See the module doc.

    States are JSON objects (``features.State``), kept decoded while pending: a key clicked several times in a
    batch (a bot, a gateway IP) is parsed and serialized once. ``put(partition, key, state)`` takes the partition
    of the event being processed, as ``table[key] = value`` would (``state`` None deletes); ``get`` sees every put
    at once. ``write`` adds the latest state of every key put since the last write, one changelog record per key
    (a tombstone for a delete); ``persisted`` records,
    once the producer acknowledges a changelog batch, the offset up to which the store holds the changelog (as
    Faust's own ``_on_changelog_sent`` does), so a restart replays only newer changelog records. ``sweep``
    deletes keys idle for longer than the state's TTL (``features.is_expired``), a slice of a partition at a time.
    """

    def __init__(self, table: Any) -> None:
        self.store = table.data  # faust.stores.rocksdb.Store
        self.topic: str = table.changelog_topic.get_topic_name()
        self.pending: dict[tuple[int, bytes], F.State | None] = {}
        self.cursor: dict[int, bytes] = {}  # partition -> the key the next sweep starts at

    def get(self, partition: int, key: bytes) -> F.State | None:
        v = self.pending.get((partition, key), _MISSING)
        if v is _MISSING:
            raw = self.store._db_for_partition(partition).get(key)
            return orjson.loads(raw) if raw is not None else None
        return v  # type: ignore[return-value]

    def put(self, partition: int, key: bytes, state: F.State | None) -> None:
        self.pending[(partition, key)] = state

    def sweep(self, partition: int, now_ms: int, visit: int) -> None:
        """Delete the keys of ``partition`` idle at event time ``now_ms``, visiting at most ``visit`` keys from
        where the previous sweep of the partition stopped (and starting over at the end)."""
        if visit <= 0:
            return
        it = self.store._db_for_partition(partition).iter()
        start = self.cursor.pop(partition, None)
        it.seek(start) if start is not None else it.seek_to_first()
        wrapped = start is None
        for _ in range(visit):
            if not it.valid():  # the end of the partition: go on from its start, once
                if wrapped:
                    return
                wrapped = True
                it.seek_to_first()
                continue
            k = it.key()
            if wrapped and start is not None and k >= start:
                self.cursor[partition] = k  # a whole round: the next sweep goes on from here
                return
            if not k.startswith(b"__faust"):  # Faust's own bookkeeping (the persisted changelog offset)
                v = self.pending.get((partition, k), _MISSING)
                hi = _state_hi(it.value()) if v is _MISSING else (None if v is None else v["hi"])  # type: ignore[index]
                if hi is not None and F.is_expired(hi, now_ms):
                    self.put(partition, k, None)
            it.next()
        if it.valid():
            self.cursor[partition] = it.key()

    def write(self, pub: Publisher) -> None:
        pending, self.pending = self.pending, {}
        batches: dict[int, Any] = {}
        for (p, k), st in pending.items():
            wb = batches.get(p)
            if wb is None:
                wb = batches[p] = rocksdict.WriteBatch(raw_mode=True)
            if st is None:
                wb.delete(k)
                pub.add(self.topic, k, None, partition=p)
            else:
                v = orjson.dumps(st)
                wb.put(k, v)
                pub.add(self.topic, k, v, partition=p)
        for p, wb in batches.items():
            self.store._db_for_partition(p).write(wb)

    def persisted(self, sent: list[tuple[str, int, int, Any]]) -> None:
        for topic, p, n, fut in sent:
            if topic == self.topic:
                fut.add_done_callback(partial(self._persisted, p, n))

    def _persisted(self, partition: int, n: int, fut: Any) -> None:
        if not fut.cancelled() and fut.exception() is None and fut.result() is not None:
            self.store.set_persisted_offset(TP(self.topic, partition), fut.result().offset + n - 1)


def _stage(cl: TableWriter, partition: int, key: bytes, c: F.ClickLike, own: int, src: tuple[int, int],
           update: Any, read: Any) -> list[float] | None:
    """One per-key table stage with at-least-once redelivery handled exactly.

    ``own``: the click's position in this stage's input (by-ip offset x BATCH_MAX + index in the record);
    ``src``: its position upstream. Returns the features, or None for a copy of a click handled already.
    """
    st = cl.get(partition, key)
    if st is not None and own <= st.get("q", -1):
        cl.put(partition, key, st)  # the local store may be ahead of the changelog after a crash: re-send
        return read(st, c)  # this very click again (our offset was not committed): its features again
    if F.is_duplicate(st, src):
        cl.put(partition, key, st)  # (as above)
        return None  # a copy from an upstream redelivery: the original is decided (or will be) on its own
    st, feats = update(st, c, src)
    st["q"] = own
    cl.put(partition, key, st)
    return feats


def _direct(cl: TableWriter, partition: int, key: bytes, c: F.ClickLike, src: tuple[int, int]) -> list[float]:
    """The user stage for a click read from the clicks topic itself (``src``: its position there)."""
    st = cl.get(partition, key)
    if st is not None and F.is_duplicate(st, src):
        # this very message again (offset not committed): forward again. The state already counts it, but a
        # crash may have left the local store ahead of the changelog: write it again so the changelog catches up
        cl.put(partition, key, st)
        return F.user_features(st, c)
    st, feats = F.update_user(st, c, src)
    cl.put(partition, key, st)
    return feats


def create_app(s: Settings, *, model: Model | None = None, model_dir: Path | None = None,
               data_dir: Path | None = None) -> faust.App:
    """Build the detector app for these settings (topics, group id, state folder all come from ``s``)."""
    if model is None:
        model = load_model(model_dir or active_model_dir(s.registry_path), s.onnx_providers)
    log.info("scoring with model %s on %s", model.version, model.provider)
    t = Topics(s.topic_prefix)
    datadir = Path(data_dir or s.home / "faust" / s.worker_id)
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        s.worker_id,
        broker=";".join(f"kafka://{b.strip()}" for b in s.kafka_bootstrap.split(",")),
        broker_credentials=s.faust_credentials(),
        store="rocksdb://",
        datadir=str(datadir),
        topic_partitions=s.partitions,
        topic_replication_factor=s.replication_factor,
        topic_allow_declare=True,
        web_enabled=s.worker_web_port != 0,
        web_port=s.worker_web_port or 6066,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,  # seconds between offset commits (redelivery window after a crash)
        producer_linger=0.005,  # seconds: let sends batch up
        producer_max_batch_size=1 << 20,  # bytes per partition batch (Faust's 16 KiB meant many small requests)
        stream_buffer_maxsize=16384,
        # bytes per partition and fetch: aiokafka sends no fetch to a broker while any of its partitions still
        # holds fetched records, so a smaller fetch keeps the stream from idling between large ones (bench/)
        consumer_max_fetch_size=256 * 1024,
        table_standby_replicas=0,
    )

    def topic(*names: str) -> Any:
        return app.topic(*names, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                         partitions=s.partitions)

    by_user_name = f"{t.prefix}.by-user"
    user_in = topic(t.clicks, by_user_name)  # both partitioned by user key (n partitions each)
    by_ip_name = f"{t.prefix}.by-ip"
    by_user, by_ip = topic(by_user_name), topic(by_ip_name)
    topic(t.decisions), topic(t.feature_log)  # declared (partitions checked) like the others

    dead = app.topic(t.dead_letters, key_type=bytes, value_type=bytes, key_serializer="raw",
                     value_serializer="raw", partitions=1)
    # bytes keys and values: raw codec (we store orjson bytes ourselves)
    users = app.Table(USERS_TABLE, default=None, partitions=s.partitions, key_type=bytes, value_type=bytes)
    ips = app.Table(IPS_TABLE, default=None, partitions=s.partitions, key_type=bytes, value_type=bytes)
    users_cl, ips_cl = TableWriter(users), TableWriter(ips)
    redis_prefix = s.redis_key_prefix + ":"
    state: dict[str, Any] = {"redis": None, "decided": 0, "dead": 0}
    app.slidr_state = state  # type: ignore[attr-defined]  # counters for logs / tests

    def producer() -> Any:
        """The aiokafka producer under Faust's (records go straight to it: Faust's Topic.send costs a
        FutureMessage, callbacks and sensors per record). Faust flushes it before every offset commit."""
        return app.producer._ensure_producer()  # type: ignore[attr-defined]

    async def dead_letter(event: Any, raw: bytes, e: SchemaError) -> None:
        msg = event.message
        dl = DeadLetter(source_topic=msg.topic, partition=msg.partition, offset=msg.offset, field=e.field,
                        error=e.reason[:512], raw_b64=_b64(raw), received_at=int(time.time() * 1000))
        await dead.send(key=None, value=dl.to_json())
        state["dead"] += 1

    user_clock: dict[int, int] = {}  # clicks partition -> latest event time seen there (the sweeps' clock)
    ip_clock: dict[int, int] = {}  # the same per by-ip partition
    user_out = Publisher(producer, lambda topic: s.partitions)

    async def user_event(event: Any, fwd: dict[int, list[bytes]]) -> None:
        """One click: validate, update its user's state, add it to the record bound for its IP's partition."""
        msg = event.message
        raw: bytes = event.value
        if msg.topic == by_user_name:  # forwarded below: validated already, src in its header
            c: Any = ClickView(orjson.loads(raw))
            sp, so = _src(event)  # its clicks position, tagged apart from the direct clicks'
            out = _stage(users_cl, msg.partition, event.key, c, msg.offset, (FORWARDED + sp, so),
                         F.update_user, F.user_features)
            tag = FORWARDED + msg.partition
        else:
            try:
                c = decode_click(raw)
            except SchemaError as e:
                await dead_letter(event, raw, e)
                return
            if event.key != c.user_key.encode():  # foreign producer: repartition by user key first
                await by_user.send(key=c.user_key.encode(), value=raw,
                                   headers={"src": f"{msg.partition},{msg.offset}".encode()})
                return
            out = _direct(users_cl, msg.partition, event.key, c, (msg.partition, msg.offset))
            tag = msg.partition
            if c.ts > user_clock.get(msg.partition, 0):
                user_clock[msg.partition] = c.ts
        if out is not None:  # forward the click with its position here (the next stage's dedupe key)
            fwd.setdefault(ip_partition(c.ip, s.partitions), []).append(
                b'{"c":' + raw + b',"u":' + orjson.dumps(out) + b',"p":[' + str(tag).encode() + b","
                + str(msg.offset).encode() + b"]}")

    @app.agent(user_in, concurrency=1)
    async def user_stage(stream: Any) -> None:
        # Batches of up to score_batch_size events or score_batch_within_s seconds. Table writes name their
        # partition (each event's own, TableWriter), never Faust's current event, so batching cannot misplace
        # them. Faust acks a batch's events, in order, after this body hands everything they caused to the
        # producer.
        async for events in stream.take_events(s.score_batch_size, within=s.score_batch_within_s):
            fwd: dict[int, list[bytes]] = {}
            for event in events:
                await user_event(event, fwd)
            per_partition = Counter(ev.message.partition for ev in events if ev.message.topic == t.clicks)
            for p, n in per_partition.items():  # ours until these events are acked
                users_cl.sweep(p, user_clock.get(p, 0), math.ceil(n * s.sweep_keys_per_click))
            for p, items in fwd.items():
                user_out.add(by_ip_name, None, b"[" + b",".join(items) + b"]", partition=p)
            users_cl.write(user_out)
            users_cl.persisted(await user_out.flush())

    ip_out = Publisher(producer, lambda topic: s.partitions)

    async def score_and_send(todo: list[tuple[int, F.ClickLike, Any, list[float]]]) -> None:
        """Profiles (one Redis MGET), one ONNX call, a decision per click and a feature-log record per by-ip
        partition. ``todo``: (by-ip partition, click, forwarded record, IP features)."""
        if state["redis"] is None:
            import redis.asyncio as aioredis

            state["redis"] = aioredis.from_url(s.redis_url, **s.redis_kwargs())
        keys: list[str] = []
        for _, c, _, _ in todo:
            ck, ik = F.profile_keys(c)
            keys.append(redis_prefix + (ck or "-"))
            keys.append(redis_prefix + ik)
        vals = await state["redis"].mget(keys)  # one round trip per batch
        cs = [c for _, c, _, _ in todo]
        rows = [F.assemble(c, rec["u"], ipf, F.profile_from(vals[2 * j], vals[2 * j + 1]))
                for j, (_, c, rec, ipf) in enumerate(todo)]
        scores = score_batch(model, np.asarray(rows, dtype=np.float32))
        decisions = decision_dicts(model, cs, scores, decided_at=int(time.time() * 1000))
        for c, d in zip(cs, decisions, strict=True):
            ip_out.add(t.decisions, c.click_id.encode(), orjson.dumps(d))
        by_partition: dict[int, list[int]] = {}
        for j, (p, _, _, _) in enumerate(todo):
            by_partition.setdefault(p, []).append(j)
        for p, js in by_partition.items():
            ip_out.add(t.feature_log, None, feature_log_record(
                model.version, [cs[j] for j in js], [rows[j] for j in js], [decisions[j]["score"] for j in js]),
                partition=p)
        state["decided"] += len(todo)

    def ip_event(event: Any, todo: list[tuple[int, F.ClickLike, Any, list[float]]]) -> None:
        """One by-ip record (the clicks of one user-stage flush bound for its partition): update the ips table
        click by click and add the clicks to score."""
        msg = event.message
        p = msg.partition
        base = msg.offset * BATCH_MAX
        n = 0
        for i, rec in enumerate(orjson.loads(event.value)):
            c = ClickView(rec["c"])
            src = (rec["p"][0], rec["p"][1])
            out = _stage(ips_cl, p, c.ip.encode(), c, base + i, src, F.update_ip, F.ip_features)
            if out is not None:  # a copy (None) has nothing to decide
                todo.append((p, c, rec, out))
                n += 1
            if c.ts > ip_clock.get(p, 0):
                ip_clock[p] = c.ts
        ips_cl.sweep(p, ip_clock.get(p, 0), math.ceil(n * s.sweep_keys_per_click))  # ours until acked

    @app.agent(by_ip, concurrency=1)
    async def ip_stage(stream: Any) -> None:
        # A few by-ip records at a time (whatever arrived within a few ms): one scoring batch, one flush. Faust
        # acks the records, in order, after this body hands everything they caused to the producer.
        async for events in stream.take_events(IP_RECORDS_PER_BATCH, within=IP_BATCH_WITHIN_S):
            todo: list[tuple[int, F.ClickLike, Any, list[float]]] = []
            for event in events:
                ip_event(event, todo)
            if todo:
                await score_and_send(todo)
            ips_cl.write(ip_out)
            ips_cl.persisted(await ip_out.flush())

    app.slidr_agents = (user_stage, ip_stage)  # type: ignore[attr-defined]
    return app


def ip_partition(ip: str, partitions: int) -> int:
    """The by-ip partition of an IP (an internal topic: any stable hash does; crc32 is C, murmur2 Python)."""
    return zlib.crc32(ip.encode()) % partitions


def feature_log_record(model_version: str, clicks: Sequence[F.ClickLike], rows: list[list[float]],
                       scores: list[float]) -> bytes:
    """One feature-log record: the clicks scored in one batch, their feature rows and scores (docs/design.md)."""
    return orjson.dumps({"model_version": model_version, "feature_spec_hash": F.FEATURE_SPEC_HASH,
                         "click_ids": [c.click_id for c in clicks], "ts": [c.ts for c in clicks],
                         "features": rows, "scores": scores})


def read_feature_log(value: bytes) -> list[dict[str, Any]]:
    """The per-click rows of one feature-log record: click_id, ts, model_version, feature_spec_hash, features,
    score."""
    r = orjson.loads(value)
    return [{"click_id": cid, "ts": ts, "model_version": r["model_version"],
             "feature_spec_hash": r["feature_spec_hash"], "features": row, "score": sc}
            for cid, ts, row, sc in zip(r["click_ids"], r["ts"], r["features"], r["scores"], strict=True)]


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def run_worker(s: Settings, *, model_dir: Path | None = None, data_dir: Path | None = None,
               loglevel: str = "info") -> None:
    """Create missing topics, build the app and run a Faust worker until stopped."""
    from faust.worker import Worker

    try:  # libuv's event loop: asyncio's own loop + selector were ~40% of the worker's time (issue 4)
        import mode.loop
        import uvloop  # noqa: F401

        mode.loop.use("uvloop")
    except ImportError:
        log.warning("uvloop is not installed: running on asyncio's slower default event loop")
    # Python's young-generation GC runs every 700 new containers; a batch's pending table states (dicts of lists)
    # live through several such runs and were promoted to older generations, whose collections then walked
    # them: 116 -> 90 us CPU a click with 20,000 (bench e2e). Cycles are still collected, a little later.
    gc.set_threshold(20_000, 20, 100)
    asyncio.run(ensure_topics(s))
    app = create_app(s, model_dir=model_dir, data_dir=data_dir)
    worker = Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    # Faust's terminal spinner sets the root logger to DEBUG (to spin on every record) whenever loglevel >=
    # WARN: aiokafka and Faust then build a debug record per message sent, ~12% of the worker's time.
    worker.spinner = None
    worker.execute_from_commandline()
