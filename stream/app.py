"""The Faust app: ingest -> per-user stage -> per-IP stage -> batched scoring.

    <prefix>.clicks --ingest--> <prefix>.by-user (key: user key) --user stage, users table-->
    <prefix>.by-ip (key: IP) --IP stage, ips table--> <prefix>.to-score (key: click id) --scoring (take, Redis
    MGET, ONNX)--> <prefix>.decisions + <prefix>.feature-log;  malformed clicks -> <prefix>.dead-letters

Every stage has concurrency 1 (faust-streaming issue 606). Table-writing stages handle one event at a time (a
table write inside ``take()`` would land in the wrong changelog partition); only the scoring stage, which
writes no table, batches. Delivery is at-least-once: Faust flushes the producer before committing offsets,
and the feature state dedupes redelivered click ids, so a crash never double counts.
"""

from __future__ import annotations

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
from stream import features as F
from stream.scoring import Model, active_model_dir, decide, load_model, score_batch

log = logging.getLogger(__name__)
USERS_TABLE = "users"
IPS_TABLE = "ips"


def internal_topics(s: Settings) -> list[TopicSpec]:
    """The worker's own topics: repartition topics and table changelogs (partitions = the data topics')."""
    p = s.topic_prefix
    n = s.partitions
    compact = (("cleanup.policy", "compact"),)
    return [
        TopicSpec(f"{p}.by-user", n, "clicks repartitioned by user key"),
        TopicSpec(f"{p}.by-ip", n, "clicks + user features repartitioned by IP"),
        TopicSpec(f"{p}.to-score", n, "clicks + user/IP features to score, keyed by click id"),
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


def _src(event: Any, _: int) -> tuple[int, int]:
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
        stream_buffer_maxsize=16384,
        table_standby_replicas=0,
    )

    def topic(name: str) -> Any:
        return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                         partitions=s.partitions)

    clicks, by_user, by_ip, to_score = (topic(x) for x in
                                        (t.clicks, f"{t.prefix}.by-user", f"{t.prefix}.by-ip",
                                         f"{t.prefix}.to-score"))
    decisions, feature_log = topic(t.decisions), topic(t.feature_log)
    dead = app.topic(t.dead_letters, key_type=bytes, value_type=bytes, key_serializer="raw",
                     value_serializer="raw", partitions=1)
    # bytes keys and values: raw codec (we store orjson bytes ourselves)
    users = app.Table(USERS_TABLE, default=None, partitions=s.partitions, key_type=bytes, value_type=bytes)
    ips = app.Table(IPS_TABLE, default=None, partitions=s.partitions, key_type=bytes, value_type=bytes)
    redis_prefix = s.redis_key_prefix + ":"
    state: dict[str, Any] = {"redis": None, "decided": 0, "dead": 0}
    app.slidr_state = state  # type: ignore[attr-defined]  # counters for logs / tests

    @app.agent(clicks, concurrency=1)
    async def ingest(stream: Any) -> None:
        async for event in stream.events():
            raw: bytes = event.value
            try:
                c = decode_click(raw)
            except SchemaError as e:
                msg = event.message
                dl = DeadLetter(source_topic=msg.topic, partition=msg.partition, offset=msg.offset,
                                field=e.field, error=e.reason[:512], raw_b64=_b64(raw),
                                received_at=int(time.time() * 1000))
                await dead.send(key=None, value=dl.to_json())
                state["dead"] += 1
                continue
            msg = event.message
            await by_user.send(key=c.user_key.encode(), value=raw,
                               headers={"src": f"{msg.partition},{msg.offset}".encode()})

    @app.agent(by_user, concurrency=1)
    async def user_stage(stream: Any) -> None:
        async for event in stream.events():
            c = _view(orjson.loads(event.value))
            own = event.message.offset
            out = await _stage(users, event.key, c, own, _src(event, 0), F.update_user, F.user_features)
            if out is not None:  # forward the click with its position here (the next stage's dedupe key)
                await by_ip.send(key=c.ip.encode(), value=b'{"c":' + event.value + b',"u":' + orjson.dumps(out)
                                 + b',"p":[' + str(event.message.partition).encode() + b"," + str(own).encode()
                                 + b"]}")

    @app.agent(by_ip, concurrency=1)
    async def ip_stage(stream: Any) -> None:
        async for event in stream.events():
            rec = orjson.loads(event.value)
            c = _view(rec["c"])
            src = (rec["p"][0], rec["p"][1])
            out = await _stage(ips, event.key, c, event.message.offset, src, F.update_ip, F.ip_features)
            if out is not None:
                await to_score.send(key=c.click_id.encode(), value=orjson.dumps(
                    {"c": rec["c"], "u": rec["u"], "i": out}))

    @app.agent(to_score, concurrency=1)
    async def scorer(stream: Any) -> None:
        import redis.asyncio as aioredis

        r = aioredis.from_url(s.redis_url, **s.redis_kwargs())
        async for values in stream.take(s.score_batch_size, within=s.score_batch_within_s):
            recs = [orjson.loads(v) for v in values]
            cs = [_view(x["c"]) for x in recs]
            keys: list[str] = []
            for c in cs:
                ck, ik = F.profile_keys(c)
                keys.append(redis_prefix + (ck or "-"))
                keys.append(redis_prefix + ik)
            vals = await r.mget(keys)  # one round trip per batch
            rows = [F.assemble(c, x["u"], x["i"], F.profile_from(vals[2 * j], vals[2 * j + 1]))
                    for j, (c, x) in enumerate(zip(cs, recs, strict=True))]
            scores = score_batch(model, np.asarray(rows, dtype=np.float32))
            now = int(time.time() * 1000)
            for c, d, row in zip(cs, decide(model, cs, scores, decided_at=now), rows, strict=True):
                k = c.click_id.encode()
                await decisions.send(key=k, value=d.to_json())
                await feature_log.send(key=k, value=orjson.dumps(
                    {"click_id": c.click_id, "ts": c.ts, "model_version": model.version,
                     "feature_spec_hash": F.FEATURE_SPEC_HASH, "features": row, "score": d.score}))
            state["decided"] += len(cs)

    app.slidr_agents = (ingest, user_stage, ip_stage, scorer)  # type: ignore[attr-defined]
    return app


def _b64(raw: bytes) -> str:
    import base64

    return base64.b64encode(raw).decode()


def run_worker(s: Settings, *, model_dir: Path | None = None, data_dir: Path | None = None,
               loglevel: str = "info") -> None:
    """Create missing topics, build the app and run a Faust worker until stopped."""
    import asyncio

    from faust.worker import Worker

    asyncio.run(ensure_topics(s))
    app = create_app(s, model_dir=model_dir, data_dir=data_dir)
    Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False).execute_from_commandline()
