"""The worker's job written in Quix Streams: a peer for ``slidr bench e2e`` (issue 21), same backlog, same run.

``python -m bench.peer TOPIC N [--state-dir DIR] [--no-feature-log]`` (env ``SLIDR_*`` for the broker, the topic
prefix and the model registry) consumes ``N`` clicks of ``TOPIC`` from the start and prints one JSON line, like
``bench/faust_bare.py``: ``events_per_s`` and ``cpu_us_per_event`` from its first click consumed to its ``N``-th
click decided (or dead-lettered), wall clock (``time.perf_counter``) and CPU time of the whole process, all
threads (``time.process_time``: librdkafka's and RocksDB's threads included), start-up, rebalance and shutdown
excluded. ``first_decision_after_s`` says how long the pipeline took to fill (click in -> first decision out);
``decisions_per_s`` is the rate from the first decision to the last.
Quix Streams is in the ``dev`` extra only; without it the bench skips the peer (``quix_missing``).

The pipeline, in Quix's own idiom (``StreamingDataFrame`` operations, RocksDB state with changelog topics on,
Quix's defaults: at-least-once, commit every 5 s), with the project's own functions doing the work:

    clicks (key: user key, raw bytes)
      .apply(decode)                    schemas.events.decode_click, the worker's event-time guard (too far ahead of
                                        the clock / behind the partition's newest click), the message key checked
      .set_timestamp(click.ts)          event time: the state TTL below counts in it
      .apply(user, stateful=True)       stream.state.apply + features.update_user, as the user stage calls them
                                        (click-id resend check, redelivery dedupe by clicks position)
      .filter(not a copy)
      .group_by(ip_key)                 Quix's repartition topic: the worker's by-ip hop
      .apply(ip, stateful=True)         stream.state.apply + features.update_ip (dedupe by clicks position)
      .filter(not a copy)
      .apply(score)                     features.assemble with features.lookup_profile, stream.scoring.score_batch
                                        (the toy ONNX model the worker loads, same providers and threads) and
                                        decision_dicts (reason codes: one more ONNX call per invalid click),
                                        feature-log record (stages.feature_log_record)
      -> branch .to_topic(<prefix>.peer-decisions, key=click_id)
      -> branch .to_topic(<prefix>.peer-feature-log)
    refused clicks (SchemaError from decode, a resend): on_processing_error -> <prefix>.peer-dead-letters

States are the worker's JSON dicts (``features.State``) under one key per user / IP, written with an event-time
TTL of ``TTL_MS + EXPIRY_GRACE_MS`` (``state.set(..., ttl=)``: Quix's counterpart of the worker's table sweep,
``features.is_expired``). The process gets the worker's GC threshold (``stream.app.run_worker``), a Python
setting and not the engine's, so the ratio does not measure it.

Where it differs from the worker (what the engine allows, or what the bench does not exercise):
- one message at a time: a state read and write per click, one ONNX call per click (two for an invalid one), a
  produce call per decision and a feature-log record per click, where the worker takes batches (a state read
  per key and batch, one ONNX call per batch, its decisions appended to one producer batch per partition, a
  feature-log record per batch and partition). Quix's DataFrame has no micro-batch operator;
  per-message processing is its idiom. Quix parses a state at every read and serialises it at every write; the
  worker keeps a batch's states decoded. Quix writes one changelog record per key changed since its last
  checkpoint (every 5 s), the worker one per key and batch (fewer records for Quix, in its favour);
- no Redis: profiles come from an empty in-process dict (the keys are built as the worker builds them). The
  bench's Redis holds no profiles for its prefix either, so the profile features are the worker's, but the
  worker pays one MGET round trip per batch that the peer does not;
- no IP watermark: per-IP state follows the repartition topic's arrival order (the worker holds clicks and
  releases them in event-time order across its input partitions, ``ip_watermark``), and no heartbeat records.
  The user features are the worker's (per user key both see the clicks topic's order; the test checks them
  against the offline driver); the IP features can differ where clicks of one IP came through different
  partitions out of event-time order (against the offline driver's global order, 57% of the rows of
  ``synth.traffic(5000)`` differ there: the IP click counts by 1.6 on average, up to 50 for a bot's IP);
- no user agent x ad counters (``features.update_combo``): the worker keeps them in its IP table under their own
  keys, but a Quix state belongs to the message key (the IP), so the peer would need one more ``group_by``. Its
  rows carry zeros there: the peer does a state read and write less per click than the worker;
- no by-user hop: a click whose message key is not its user key is dead-lettered (the worker repartitions it
  by user first; every click of the bench is keyed by its user key, so the worker does not hop either);
- dead letters and the feature log go to the peer's own topics; a Quix branch copies the scored value once
  (pickle) for the second ``to_topic``;
- no retries / fail-stop policy, metrics, health or hot model swap (none of them costs per click in the worker
  beyond a counter or two).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from operator import itemgetter
from typing import Any, cast

import orjson

from slidr.settings import Settings


def quix_missing() -> str | None:
    """Why the peer cannot run here (None when Quix Streams is importable)."""
    import importlib.util

    try:
        found = importlib.util.find_spec("quixstreams") is not None
    except (ImportError, ValueError) as e:
        return f"quixstreams cannot be imported: {e!r}"
    return None if found else "quixstreams is not installed (it is in the dev extra: pip install -e '.[dev]')"


@dataclass(frozen=True)
class PeerTopics:
    """The peer's own topics: outputs under the deployment's prefix, internal ones named by Quix after its group."""

    prefix: str

    @property
    def decisions(self) -> str:
        return f"{self.prefix}.peer-decisions"

    @property
    def feature_log(self) -> str:
        return f"{self.prefix}.peer-feature-log"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}.peer-dead-letters"

    @property
    def group(self) -> str:  # Quix's consumer group; its changelog / repartition topics are <type>__<group>--...
        return f"{self.prefix}-quix-peer"

    def internal(self, name: str) -> bool:
        return f"__{self.group}--" in name


async def create_peer_topics(s: Settings) -> None:
    from slidr.services import create_topics_async
    from slidr.topics import TopicSpec

    pt = PeerTopics(s.topic_prefix)
    await create_topics_async(s, [TopicSpec(pt.decisions, s.partitions, "peer decisions"),
                                  TopicSpec(pt.feature_log, s.partitions, "peer feature log"),
                                  TopicSpec(pt.dead_letters, 1, "peer dead letters")])


async def drop_internal_topics(s: Settings) -> list[str]:
    """Delete the changelog and repartition topics Quix created for the peer (they do not carry the prefix)."""
    from slidr.services import drop_topics_async

    return await drop_topics_async(s, PeerTopics(s.topic_prefix).internal)


def connection(s: Settings) -> Any:
    """Quix's broker address from the project's settings."""
    if s.kafka_security_protocol == "PLAINTEXT":
        return s.kafka_bootstrap
    from quixstreams.kafka.configuration import ConnectionConfig

    kw: dict[str, Any] = {"bootstrap_servers": s.kafka_bootstrap, "security_protocol": s.kafka_security_protocol}
    if s.kafka_security_protocol.startswith("SASL"):
        kw.update(sasl_mechanism=s.kafka_sasl_mechanism or "PLAIN", sasl_username=s.kafka_sasl_username,
                  sasl_password=s.kafka_sasl_password.get_secret_value() if s.kafka_sasl_password else None)
    if s.kafka_ssl_cafile:
        kw["ssl_ca_location"] = str(s.kafka_ssl_cafile)
    if s.kafka_ssl_certfile:
        kw.update(ssl_certificate_location=str(s.kafka_ssl_certfile), ssl_key_location=str(s.kafka_ssl_keyfile))
    return ConnectionConfig(**kw)


class KeyState:
    """``stream.state.apply``'s table interface (get / put by partition and key) over the Quix ``State`` of the
    message being processed: Quix scopes state to the current message's key, so partition and key are implied."""

    __slots__ = ("state", "ttl")

    def __init__(self, ttl: timedelta) -> None:
        self.state: Any = None
        self.ttl = ttl  # event time (the record's timestamp) + ttl: Quix deletes the key after that

    def get(self, partition: int, key: bytes) -> Any:
        return self.state.get("s")

    def put(self, partition: int, key: bytes, st: Any) -> None:
        if st is None:
            self.state.delete("s")
        else:
            self.state.set("s", st, ttl=self.ttl)


@dataclass
class Meter:
    """First click in -> ``n``-th click out (decided or dead-lettered): wall clock and process CPU."""

    n: int
    stop: Any = None  # Application.stop
    seen: int = 0
    decided: int = 0
    dead: int = 0
    t0: float = 0.0
    c0: float = 0.0
    t_first_decision: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)
    producers: list[Any] = field(default_factory=list)  # flushed once the application stopped (dead letters)

    def click(self) -> None:
        if self.seen == 0:
            self.t0, self.c0 = time.perf_counter(), time.process_time()
        self.seen += 1

    def out(self, dead: bool = False) -> None:
        if dead:
            self.dead += 1
        else:
            self.decided += 1
            if self.decided == 1:
                self.t_first_decision = time.perf_counter()
        if self.decided + self.dead == self.n:
            dt, dc = time.perf_counter() - self.t0, time.process_time() - self.c0
            self.result = {"events": self.n, "decided": self.decided, "dead_letters": self.dead,
                           "events_per_s": round(self.n / dt), "cpu_us_per_event": round(1e6 * dc / self.n, 1),
                           "first_decision_after_s": round(self.t_first_decision - self.t0, 3),
                           # first -> last decision, the basis of the bench's worker_clicks_per_s
                           "decisions_per_s": round(self.decided / max(dt - (self.t_first_decision - self.t0),
                                                                       1e-3)),
                           "span_s": round(dt, 3)}
            if self.stop is not None:
                self.stop()


def build(s: Settings, topic: str, n: int, state_dir: str, feature_log: bool = True) -> tuple[Any, Meter]:
    """The Quix application (see the module doc) and the meter its last operation reports to."""
    import logging

    import numpy as np
    from quixstreams import Application, message_context

    from schemas.events import DeadLetter, SchemaError, decode_click
    from stream import features as F
    from stream.scoring import active_model_dir, decision_dicts, load_model, score_batch
    from stream.stages import feature_log_record
    from stream.state import DUPLICATE_ID, ClickView, Stats, TableWriter, apply

    pt = PeerTopics(s.topic_prefix)
    model = load_model(active_model_dir(s.registry_path), s.onnx_providers)
    meter = Meter(n)

    def on_error(exc: Exception, row: Any, logger: logging.Logger) -> bool:
        """A click the worker would dead-letter (what decode and the resend check raise): to the dead letters."""
        if not isinstance(exc, SchemaError) or row is None:
            return False  # anything else stops the application, as Quix does by default
        if not meter.producers:  # the producer of dead letters, made for the first one
            meter.producers.append(app.get_producer())
        raw = row.value if isinstance(row.value, bytes) else b""
        dl = DeadLetter(source_topic=row.topic, partition=row.partition, offset=row.offset, field=exc.field,
                        error=exc.reason[:512], raw_b64=base64.b64encode(raw).decode(),
                        received_at=int(time.time() * 1000))
        meter.producers[0].produce(pt.dead_letters, value=dl.to_json(), partition=0)
        meter.out(dead=True)
        return True

    app = Application(broker_address=connection(s), consumer_group=pt.group, auto_offset_reset="earliest",
                      state_dir=state_dir, loglevel="WARNING", on_processing_error=on_error)
    meter.stop = app.stop
    clicks = app.topic(topic, key_deserializer="bytes", value_deserializer="bytes")
    decisions = app.topic(pt.decisions, key_serializer="str", value_serializer="json")
    flog = app.topic(pt.feature_log, key_serializer="str", value_serializer="bytes")

    # the user stage's guard (UserStage.out_of_time): its clocks are per process, as the worker's are
    skew_ms = int(s.max_future_skew_s * 1000)
    late_ms = F.TTL_MS + int(s.max_lateness_s * 1000)
    clock: dict[int, int] = {}

    def decode(raw: bytes, key: bytes, ts: int, headers: Any) -> tuple[Any, bytes]:
        meter.click()
        c = decode_click(raw)
        if c.ts - int(time.time() * 1000) > skew_ms:
            raise SchemaError("ts", f"event time {c.ts} is ahead of the peer's clock")
        if clock.get(message_context().partition, 0) - c.ts > late_ms:
            raise SchemaError("ts", f"event time {c.ts} is too far behind its partition's newest event time")
        if key != c.user_key.encode():
            raise SchemaError("key", "not keyed by its user key (the peer has no by-user hop)")
        return c, raw

    ttl = timedelta(milliseconds=F.TTL_MS + F.EXPIRY_GRACE_MS)  # features.is_expired's idle time
    users, ips = KeyState(ttl), KeyState(ttl)
    ustats, istats = Stats(), Stats()
    table = cast(TableWriter, users)  # (apply is typed for the worker's TableWriter: it calls get and put only)
    itable = cast(TableWriter, ips)

    def user(v: tuple[Any, bytes], state: Any) -> dict[str, Any] | None:
        c, raw = v
        ctx = message_context()
        p, off = ctx.partition, ctx.offset
        users.state = state
        out = apply(table, p, b"", c, (p, off), F.update_user, ustats, check_id=True)
        if out is DUPLICATE_ID:
            raise SchemaError("click_id", "duplicate: this user key had a click with this id")
        if c.ts > clock.get(p, 0):
            clock[p] = c.ts
        if out is None:
            return None  # a copy: its outputs are in Kafka already
        # the raw click goes on as it came (orjson.Fragment: embedded, not parsed and dumped again), as the worker
        # forwards it in its by-ip records
        return {"c": orjson.Fragment(raw), "u": out, "p": [p, off], "i": c.ip_key}

    def ip(v: dict[str, Any], state: Any) -> tuple[Any, list[float], list[float]] | None:
        c = ClickView(v["c"])
        ips.state = state
        src = v["p"]
        ipf = apply(itable, 0, b"", c, (src[0], src[1]), F.update_ip, istats)
        return None if ipf is None else (c, v["u"], ipf)

    no_profiles: dict[str, bytes] = {}
    no_combo = [0.0] * F.N_COMBO  # (see the module doc)

    def score(v: tuple[Any, list[float], list[float]]) -> tuple[dict[str, Any], bytes | None]:
        c, uf, ipf = v
        row = F.assemble(c, uf, ipf, no_combo, F.lookup_profile(c, no_profiles.get))
        x = np.asarray([row], dtype=np.float32)
        scores = score_batch(model, x)
        (d,) = decision_dicts(model, [c], scores, decided_at=int(time.time() * 1000), features=x)
        return d, (feature_log_record(model.version, [c], [row], [d["score"]]) if feature_log else None)

    sdf = app.dataframe(clicks)
    sdf = sdf.apply(decode, metadata=True)
    sdf = sdf.set_timestamp(lambda v, key, ts, headers: v[0].ts)
    sdf = sdf.apply(user, stateful=True)
    sdf = sdf.filter(lambda v: v is not None)
    sdf = sdf.group_by(itemgetter("i"), name="ip")
    sdf = sdf.apply(ip, stateful=True)
    sdf = sdf.filter(lambda v: v is not None)
    sdf = sdf.apply(score)
    if feature_log:
        sdf.apply(itemgetter(1)).to_topic(flog)
    out = sdf.apply(itemgetter(0))
    out.to_topic(decisions, key=itemgetter("click_id"))
    out.update(lambda d: meter.out())
    return app, meter


def run_peer(topic: str, n: int, state_dir: str | None = None, feature_log: bool = True) -> dict[str, Any]:
    """Run the peer in this process until ``n`` clicks are out; its figures."""
    import tempfile

    s = Settings()
    asyncio.run(create_peer_topics(s))
    # the worker's GC setting (stream.app.run_worker): a Python setting, not the engine's
    gc.set_threshold(20_000, 20, 100)
    try:
        with tempfile.TemporaryDirectory(dir=state_dir) as d:
            app, meter = build(s, topic, n, d, feature_log)
            app.run()
            for p in meter.producers:
                p.flush()
    finally:
        asyncio.run(drop_internal_topics(s))
    if not meter.result:
        raise RuntimeError(f"the peer stopped after {meter.decided} decisions and {meter.dead} dead letters of {n}")
    return {**meter.result, "feature_log": feature_log}


def measure(s: Settings, topic: str, n: int, timeout_s: float, state_dir: str | None = None,
            feature_log: bool = True) -> dict[str, Any]:
    """Run the peer over ``topic`` in its own process (as ``bench/e2e.py`` runs the bare Faust agent); its result,
    or ``{"skipped": why}`` when Quix Streams is not installed. Its internal topics are deleted in any case."""
    import subprocess

    why = quix_missing()
    if why is not None:
        return {"skipped": why}
    from bench.e2e import worker_env

    cmd = [sys.executable, "-m", "bench.peer", topic, str(n)] + (["--state-dir", state_dir] if state_dir else []) \
        + ([] if feature_log else ["--no-feature-log"])
    try:
        out = subprocess.run(cmd, env=worker_env(s), capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"bench.peer did not finish in {timeout_s:.0f} s: {(e.stderr or b'').decode()[-2000:]}") \
            from None
    finally:
        asyncio.run(drop_internal_topics(s))  # (the peer deletes them itself unless it was killed)
    for line in out.stdout.decode().splitlines()[::-1]:
        if line.startswith("{"):
            return dict(orjson.loads(line))
    raise RuntimeError(f"bench.peer printed no result (rc {out.returncode}): {out.stderr.decode()[-2000:]}")


def run(**opts: Any) -> dict[str, Any]:
    """``slidr bench peer``: the same as ``slidr bench e2e`` (the worker, the bare Faust agent and this peer over
    one backlog in one run), under the issue's name."""
    from bench import e2e

    return e2e.run(**opts)


def main(argv: list[str]) -> None:
    import warnings

    # quixstreams imports confluent-kafka's schema-registry client, which imports a deprecated authlib module
    # (authlib turns its own deprecation warnings on for good: silenced for the import only)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import quixstreams  # noqa: F401
    topic, n = argv[0], int(argv[1])
    state_dir = argv[argv.index("--state-dir") + 1] if "--state-dir" in argv else None
    res = run_peer(topic, n, state_dir, feature_log="--no-feature-log" not in argv)
    print(orjson.dumps(res).decode(), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
