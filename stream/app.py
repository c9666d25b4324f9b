"""The Faust app: a per-user stage and a per-IP stage that also scores, in batches.

    <prefix>.clicks (key: user key) --user stage: validate, users table--> <prefix>.by-ip (key: IP)
        --IP stage: ips table, buffer; every N clicks / T s: Redis MGET, one ONNX call-->
        <prefix>.decisions + <prefix>.feature-log;  malformed clicks -> <prefix>.dead-letters
    a click whose message key is not its user key (a foreign producer) -> <prefix>.by-user (key: user key),
        which the user stage also consumes (it writes the users table only for keys its partition owns)

Why this shape (issue 4: throughput): every internal Kafka hop costs a produce, a consume and a pass through
Faust's stream machinery per click, which dominated the profile. Producers key clicks by user key
(``Click.user_key``), so the clicks topic is already partitioned like the users table and the user stage reads
it directly (no ingest hop); only the IP repartition remains (a key has one owner). Scoring runs inside the IP
stage: it handles events one at a time (a table write inside ``take()`` would land in the wrong changelog
partition) over a ``noack()`` stream, buffers the assembled clicks and scores the buffer when it holds
``score_batch_size`` clicks or every ``score_batch_within_s`` seconds (a timer). A buffered event is acked only
after its decision was handed to the producer, strictly in offset order, and Faust flushes the producer before
it commits acked offsets (with ``stream/faust_fixes.py`` correcting which acked offsets it may commit), so
no offset is committed before its click's decision is sent (at-least-once). Records go straight to
``app.producer`` (no per-record FutureMessage), the event loop is uvloop when installed, and the worker turns
off Faust's terminal spinner, which set the root logger to DEBUG (a log record built per record sent).

Every stage has concurrency 1 (faust-streaming issue 606). Redelivered clicks are recognised by their upstream
position (see ``_stage``), so a crash never double counts.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from pathlib import Path
from typing import Any

import faust
import numpy as np
import orjson

from schemas.events import Click, DeadLetter, SchemaError, decode_click
from slidr.settings import Settings
from slidr.topics import Topics, TopicSpec, topic_specs
from stream import faust_fixes
from stream import features as F
from stream.scoring import Model, active_model_dir, decide, load_model, score_batch

log = logging.getLogger(__name__)
faust_fixes.install()  # never commit past an unacked offset (faust-streaming 0.15.3 can): see the module
USERS_TABLE = "users"
IPS_TABLE = "ips"
FORWARDED = 1 << 16  # by-ip "p" tag of a click that came through by-user: FORWARDED + its by-user partition


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


def _view(d: dict[str, Any]) -> Click:
    """A Click from an already validated dict, without validating it again (hot path)."""
    return Click.model_construct(**d)


def _src(event: Any) -> tuple[int, int]:
    """Position of a click read from the clicks topic: the user stage's dedupe key (via the message header)."""
    h = dict(event.headers or {}).get("src")
    if h is None:
        raise ValueError("a by-user message without its src header")
    p, o = h.split(b",")
    return int(p), int(o)


async def _stage(table: Any, key: bytes, c: Click, own: int, src: tuple[int, int],
                 update: Any, read: Any) -> list[float] | None:
    """One per-key table stage with at-least-once redelivery handled exactly.

    ``own``: the message's offset in this stage's input; ``src``: the click's position upstream. Returns the
    features to forward, or None when the message is a copy of one handled already (nothing to forward).
    """
    old = table.get(key)
    st = orjson.loads(old) if old is not None else None
    if st is not None and own <= st.get("q", -1):
        return read(st, c)  # this very message again (our offset was not committed): forward again, no update
    if F.is_duplicate(st, src):
        return None  # a copy from an upstream redelivery: the original message does the forwarding
    st, feats = update(st, c, src)
    st["q"] = own
    table[key] = orjson.dumps(st)
    return feats


def _direct(table: Any, key: bytes, c: Click, src: tuple[int, int]) -> list[float]:
    """The user stage for a click read from the clicks topic itself (``src``: its position there)."""
    old = table.get(key)
    st = orjson.loads(old) if old is not None else None
    if st is not None and F.is_duplicate(st, src):
        return F.user_features(st, c)  # this very message again (offset not committed): forward again
    st, feats = F.update_user(st, c, src)
    table[key] = orjson.dumps(st)
    return feats


def _broker_credentials(s: Settings) -> Any:
    if s.kafka_security_protocol == "PLAINTEXT":
        return None
    ctx = s.kafka_client_kwargs().get("ssl_context")
    if s.kafka_security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=s.kafka_sasl_username, ssl_context=ctx, mechanism=s.kafka_sasl_mechanism or "PLAIN",
            password=s.kafka_sasl_password.get_secret_value() if s.kafka_sasl_password else None,
        )
    return faust.SSLCredentials(ctx)


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
        broker_credentials=_broker_credentials(s),
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

    async def send(name: str, key: bytes, value: bytes) -> None:
        """Hand one record to the producer (no wait for delivery; Faust flushes it before each commit).
        Straight to the producer: Faust's Topic.send costs a FutureMessage and callbacks per record."""
        await app.producer.send(name, key, value, partition=None, timestamp=None, headers=None)
    dead = app.topic(t.dead_letters, key_type=bytes, value_type=bytes, key_serializer="raw",
                     value_serializer="raw", partitions=1)
    # bytes keys and values: raw codec (we store orjson bytes ourselves)
    users = app.Table(USERS_TABLE, default=None, partitions=s.partitions, key_type=bytes, value_type=bytes)
    ips = app.Table(IPS_TABLE, default=None, partitions=s.partitions, key_type=bytes, value_type=bytes)
    redis_prefix = s.redis_key_prefix + ":"
    state: dict[str, Any] = {"redis": None, "decided": 0, "dead": 0}
    app.slidr_state = state  # type: ignore[attr-defined]  # counters for logs / tests

    async def dead_letter(event: Any, raw: bytes, e: SchemaError) -> None:
        msg = event.message
        dl = DeadLetter(source_topic=msg.topic, partition=msg.partition, offset=msg.offset, field=e.field,
                        error=e.reason[:512], raw_b64=_b64(raw), received_at=int(time.time() * 1000))
        await dead.send(key=None, value=dl.to_json())
        state["dead"] += 1

    @app.agent(user_in, concurrency=1)
    async def user_stage(stream: Any) -> None:
        async for event in stream.events():
            msg = event.message
            raw: bytes = event.value
            if msg.topic == by_user_name:  # forwarded below: validated already, src in its header
                c = _view(orjson.loads(raw))
                sp, so = _src(event)  # its clicks position, tagged apart from the direct clicks'
                out = await _stage(users, event.key, c, msg.offset, (FORWARDED + sp, so), F.update_user,
                                   F.user_features)
                tag = FORWARDED + msg.partition
            else:
                try:
                    c = decode_click(raw)
                except SchemaError as e:
                    await dead_letter(event, raw, e)
                    continue
                if event.key != c.user_key.encode():  # foreign producer: repartition by user key first
                    await by_user.send(key=c.user_key.encode(), value=raw,
                                       headers={"src": f"{msg.partition},{msg.offset}".encode()})
                    continue
                out = _direct(users, event.key, c, (msg.partition, msg.offset))
                tag = msg.partition
            if out is not None:  # forward the click with its position here (the next stage's dedupe key)
                await send(by_ip_name, c.ip.encode(), b'{"c":' + raw + b',"u":' + orjson.dumps(out)
                           + b',"p":[' + str(tag).encode() + b"," + str(msg.offset).encode() + b"]}")

    # The IP stage's scoring buffer: (event, click, record, IP features), click None for a copy with nothing to
    # decide. Events are acked strictly in offset order, after their decisions went to the producer (Faust itself
    # may still ack skipped events out of order around a rebalance: stream/faust_fixes.py keeps commits safe).
    pending: list[tuple[Any, Click | None, Any, list[float]]] = []
    scoring = asyncio.Lock()  # one batch at a time, in arrival order (asyncio locks are FIFO)

    async def score_pending() -> None:
        """Score and publish the buffered clicks in one batch, then ack their events in order."""
        async with scoring:
            if not pending:
                return
            batch = pending[:]
            pending.clear()
            todo = [(c, rec, ipf) for _, c, rec, ipf in batch if c is not None]
            if todo:
                await score_and_send(todo)
            for ev, _, _, _ in batch:  # decisions are with the producer: these offsets may be committed
                ev.ack()

    async def score_and_send(todo: list[tuple[Click, Any, list[float]]]) -> None:
        if state["redis"] is None:
            import redis.asyncio as aioredis

            state["redis"] = aioredis.from_url(s.redis_url, **s.redis_kwargs())
        keys: list[str] = []
        for c, _, _ in todo:
            ck, ik = F.profile_keys(c)
            keys.append(redis_prefix + (ck or "-"))
            keys.append(redis_prefix + ik)
        vals = await state["redis"].mget(keys)  # one round trip per batch
        cs = [c for c, _, _ in todo]
        rows = [F.assemble(c, rec["u"], ipf, F.profile_from(vals[2 * j], vals[2 * j + 1]))
                for j, (c, rec, ipf) in enumerate(todo)]
        scores = score_batch(model, np.asarray(rows, dtype=np.float32))
        now = int(time.time() * 1000)
        for c, d, row in zip(cs, decide(model, cs, scores, decided_at=now), rows, strict=True):
            k = c.click_id.encode()
            await send(t.decisions, k, d.to_json())
            await send(t.feature_log, k, orjson.dumps(
                {"click_id": c.click_id, "ts": c.ts, "model_version": model.version,
                 "feature_spec_hash": F.FEATURE_SPEC_HASH, "features": row, "score": d.score}))
        state["decided"] += len(todo)

    @app.agent(by_ip, concurrency=1)
    async def ip_stage(stream: Any) -> None:
        async for event in stream.noack().events():
            rec = orjson.loads(event.value)
            c = _view(rec["c"])
            src = (rec["p"][0], rec["p"][1])
            out = await _stage(ips, event.key, c, event.message.offset, src, F.update_ip, F.ip_features)
            # a copy (out None) has nothing to decide but is acked in its turn, after the clicks before it
            pending.append((event, c if out is not None else None, rec, out or []))
            if len(pending) >= s.score_batch_size:
                await score_pending()

    @app.timer(s.score_batch_within_s)
    async def score_timer() -> None:
        await score_pending()  # a partly filled buffer waits at most score_batch_within_s

    app.slidr_agents = (user_stage, ip_stage)  # type: ignore[attr-defined]
    return app


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
    asyncio.run(ensure_topics(s))
    app = create_app(s, model_dir=model_dir, data_dir=data_dir)
    worker = Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    # Faust's terminal spinner sets the root logger to DEBUG (to spin on every record) whenever loglevel >=
    # WARN: aiokafka and Faust then build a debug record per message sent, ~12% of the worker's time.
    worker.spinner = None
    worker.execute_from_commandline()
