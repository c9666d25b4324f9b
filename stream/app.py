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
position (``stream.state.apply``): a batch's outputs are acknowledged before its table state is written, so a
redelivered click is either computed again from the state it saw the first time or known to be in Kafka
already; a crash never double counts and a repeated decision equals the first. Their keys' states are written
again, so a changelog left behind the local store by a crash catches up. What goes wrong inside a batch is
handled by the stage's error policy (``stream/stages.py``): dead letters, degraded scoring without Redis,
all-or-nothing retries, and a stop without committing when nothing else is safe. Every stage has concurrency 1
(faust-streaming issue 606). The event loop is uvloop when installed, and the worker turns off Faust's terminal
spinner, which set the root logger to DEBUG (a log record built per record sent).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust
from faust.types import TP

from slidr.settings import Settings
from slidr.topics import Topics, TopicSpec, changelog_topic, topic_specs
from stream import diagnose, faust_fixes, metrics
from stream import features as F
from stream.health import CHECK_EVERY_S, Health, Watchdog
from stream.scoring import Model, active_model_dir, load_model
from stream.stages import (  # noqa: F401  (re-exported: tests and tools read records with these)
    FORWARDED,
    IP_BATCH_WITHIN_S,
    IP_RECORDS_PER_BATCH,
    ConsumerOps,
    IpStage,
    UserStage,
    fail_stop,
    feature_log_record,
    ip_partition,
    read_feature_log,
)
from stream.state import ClickView, TableWriter, _state_hi  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)
faust_fixes.install()  # commit only acked runs of offsets, and commit at all on a new group: see the module
USERS_TABLE = "users"
IPS_TABLE = "ips"


def internal_topics(s: Settings) -> list[TopicSpec]:
    """The worker's own topics: repartition topics and table changelogs (partitions = the data topics')."""
    p = s.topic_prefix
    n = s.partitions
    compact = (("cleanup.policy", "compact"),)
    return [
        TopicSpec(f"{p}.by-user", n, "clicks of foreign producers repartitioned by user key"),
        TopicSpec(f"{p}.by-ip", n, "clicks + user features repartitioned by IP"),
        TopicSpec(changelog_topic(s, USERS_TABLE), n, "users table changelog", compact),
        TopicSpec(changelog_topic(s, IPS_TABLE), n, "ips table changelog", compact),
    ]


async def ensure_topics(s: Settings) -> list[str]:
    """Create every topic the worker reads or writes that does not exist yet (idempotent)."""
    from slidr.services import create_topics_async

    return await create_topics_async(s, topic_specs(s) + internal_topics(s))


@dataclass(frozen=True)
class Wiring:
    """The topics a detector app reads and writes. The live worker's (``live_wiring``) and a replay agent's
    (``stream.replay``) differ only here: the stages are the same objects. ``topics``: clicks in; decisions,
    feature log and dead letters out."""

    topics: Topics
    by_user: str  # foreign producers' clicks, repartitioned by user key (read by the user stage too)
    by_ip_out: str  # where the user stage sends its by-ip records
    by_ip_in: str  # what the IP stage reads (the same topic in the live worker)


def live_wiring(s: Settings) -> Wiring:
    t = Topics(s.topic_prefix)
    return Wiring(t, f"{t.prefix}.by-user", f"{t.prefix}.by-ip", f"{t.prefix}.by-ip")


def create_app(s: Settings, *, model: Model | None = None, model_dir: Path | None = None,
               data_dir: Path | None = None, wiring: Wiring | None = None) -> faust.App:
    """Build the detector app for these settings (topics, group id, state folder all come from ``s``): declare
    the topics and tables, build the two stages (``stream/stages.py``) and bind an agent to each. ``wiring``:
    the topics (default: the live worker's)."""
    if s.combo_shards != F.COMBO_SHARDS:
        raise ValueError(f"combo_shards={s.combo_shards} in these settings, but this process's features use "
                         f"{F.COMBO_SHARDS} (SLIDR_COMBO_SHARDS, read once when stream.features is imported): set it "
                         "in the environment")
    if F.COMBO_SHARDS % s.partitions:
        raise ValueError(f"partitions={s.partitions}: the IP stage keeps the user agent x ad counters of "
                         f"{F.COMBO_SHARDS} shards of IPs (stream.features.update_combo), so the partition count "
                         f"must divide {F.COMBO_SHARDS} (one of "
                         f"{[d for d in range(1, F.COMBO_SHARDS + 1) if F.COMBO_SHARDS % d == 0]}) for each shard "
                         "to have one owner; more partitions need a model trained with more shards "
                         "(SLIDR_COMBO_SHARDS, a multiple of the partition count, set alike for training and workers)")
    follow_registry = model is None and model_dir is None  # hot swap: follow the registry's ACTIVE pointer
    if model is None:
        model = load_model(model_dir or active_model_dir(s.registry_path), s.onnx_providers)
    metrics.set_active(model.version)
    w = wiring or live_wiring(s)
    t = w.topics
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
        web_bind=s.worker_web_bind,
        web_tables_enabled=False,  # /table/<name>/<key>/ served a customer's counters, an IP's users
        web_router_enabled=False,
        web_graph_enabled=False,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,  # seconds between offset commits (redelivery window after a crash)
        broker_session_timeout=s.kafka_session_timeout_s,
        broker_heartbeat_interval=min(3.0, s.kafka_session_timeout_s / 3),
        producer_linger=0.005,  # seconds: let sends batch up
        producer_max_batch_size=1 << 20,  # bytes per partition batch (Faust's 16 KiB meant many small requests)
        stream_buffer_maxsize=16384,
        # bytes per partition and fetch: aiokafka sends no fetch to a broker while any of its partitions still
        # holds fetched records, so a smaller fetch keeps the stream from idling between large ones (bench/)
        consumer_max_fetch_size=256 * 1024,
        table_standby_replicas=0,
    )

    def topic(*names: str) -> Any:
        return faust_fixes.raw_topic(app, *names, partitions=s.partitions)

    by_user_name = w.by_user
    user_in = topic(t.clicks, by_user_name)  # both partitioned by user key (n partitions each)
    by_ip_name = w.by_ip_out
    by_ip = topic(w.by_ip_in)
    faust_fixes.gapless(by_user_name, w.by_ip_in)  # our own repartition topics: no control records in them
    topic(by_user_name), topic(by_ip_name), topic(t.decisions), topic(t.feature_log)  # declared like the others
    faust_fixes.raw_topic(app, t.dead_letters, partitions=1)

    def table(name: str) -> Any:
        """A plain table of raw bytes (we store orjson bytes ourselves) whose changelog carries the topic
        prefix (Faust's default name, ``<app id>-<table>-changelog``, would be shared by two deployments on one
        broker with the same worker id)."""
        changelog = app.topic(changelog_topic(s, name), key_type=bytes, value_type=bytes, key_serializer="raw",
                              value_serializer="raw", partitions=s.partitions, compacting=True, deleting=False,
                              acks=False, internal=True, maxsize=131_072, allow_empty=True)
        rocks = {"write_buffer_size": s.rocksdb_write_buffer_mib << 20, "max_write_buffer_number": 2,
                 "block_cache_size": s.rocksdb_block_cache_mib << 20}  # bounded memory per store (settings)
        return app.Table(name, default=None, partitions=s.partitions, key_type=bytes, value_type=bytes,
                         changelog_topic=changelog, options=rocks)

    def producer() -> Any:
        """The aiokafka producer under Faust's (records go straight to it: Faust's Topic.send costs a
        FutureMessage, callbacks and sensors per record). Faust flushes it before every offset commit."""
        return app.producer._ensure_producer()  # type: ignore[attr-defined]

    class Ops(ConsumerOps):
        def do_not_count(self, message: Any) -> None:
            faust_fixes.do_not_count(app.consumer, message)

        async def seek(self, topic_name: str, partition: int, offset: int) -> bool:
            return await faust_fixes.rewind(app.consumer, TP(topic_name, partition), offset)

        def committed(self, topic_name: str, partition: int) -> int | None:
            return faust_fixes.committed_offset(app.consumer, topic_name, partition)

        def count(self, message: Any) -> None:
            faust_fixes.count_ack(app.consumer, message)

        def current(self, message: Any) -> bool:
            return faust_fixes.current(app.consumer, message)

        def start(self, topic_name: str, partition: int) -> int | None:
            return faust_fixes.start_offset(app.consumer, topic_name, partition)

        def held_since(self, topic_name: str, partition: int) -> int | None:
            return faust_fixes.held_since(app.consumer, topic_name, partition)

        def generation(self) -> int | None:
            return app.consumer_generation_id

        def active(self) -> bool:
            return app.flow_control.is_active()

    users = UserStage(s, t, TableWriter(table(USERS_TABLE)), producer, by_user_name, by_ip_name, Ops())
    ips = IpStage(s, t, TableWriter(table(IPS_TABLE)), producer, w.by_ip_in, model, Ops())

    @app.agent(user_in, concurrency=1)
    async def user_stage(stream: Any) -> None:
        # Batches of up to score_batch_size events or score_batch_within_s seconds; Faust acks a batch's events,
        # in order, when the loop comes round, after ``run`` handed everything they caused to the producer.
        # ``run`` never raises (stream/stages.py: the error policy).
        async for events in stream.take_events(s.score_batch_size, within=s.score_batch_within_s):
            await users.run(events)

    @app.agent(by_ip, concurrency=1)
    async def ip_stage(stream: Any) -> None:
        # A few by-ip records at a time (whatever arrived within a few ms): one scoring batch, one flush.
        async for events in stream.take_events(IP_RECORDS_PER_BATCH, within=IP_BATCH_WITHIN_S):
            await ips.run(events)

    @app.timer(0.2)
    async def stage_ticks() -> None:
        # Batches without new events: held clicks (the IP stage's watermark) leave when their inputs pass them
        # or go idle, and a partition awaited since a jump is sought again, also while no records come. ``run``
        # takes turns with the agents' batches and never raises.
        await users.tick()
        await ips.tick()

    swap = ModelSwap(s, ips) if follow_registry else None

    @app.timer(s.model_poll_s)
    async def follow_active_model() -> None:
        if swap is not None:
            await swap.check()

    @app.timer(5.0)
    async def gauges() -> None:
        for tp, lag in faust_fixes.consumer_lag(app.consumer).items():
            metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(lag)
        metrics.TABLE_KEYS.labels(USERS_TABLE).set(sum(users.writer.count.values()))
        metrics.TABLE_KEYS.labels(IPS_TABLE).set(sum(ips.writer.count.values()))
        for name, stage in ((USERS_TABLE, users), (IPS_TABLE, ips)):
            for kind, n in stage.writer.memory().items():
                metrics.TABLE_ROCKSDB.labels(name, kind).set(n)

    inputs = {t.clicks, by_user_name, by_ip_name}  # (not the changelogs: recovered, then only written)

    def on_inputs(per_partition: Callable[[Any], dict[Any, int]]) -> Callable[[], int]:
        """The sum over the input partitions of a per-partition count of the consumer's."""
        return lambda: sum(n for tp, n in per_partition(app.consumer).items() if tp.topic in inputs)

    health = Health((users, ips), on_inputs(faust_fixes.consumer_lag), lambda: bool(app.consumer.assignment()),
                    lambda: producer().client, s.health_stuck_after_s, busy=lambda: bool(app.rebalancing),
                    uncommitted=on_inputs(faust_fixes.commit_lag))
    loop: list[asyncio.AbstractEventLoop] = []

    def stuck(why: str) -> None:
        log.critical("%s", diagnose.report(app, (users, ips), loop[0] if loop else None))
        fail_stop(f"stuck: {why}")

    watchdog = Watchdog(health, stuck)

    @app.task
    async def start_watchdog() -> None:  # (app tasks start once the tables have recovered, as the agents do)
        if s.health_stuck_exit:
            loop.append(asyncio.get_running_loop())
            health.start()
            watchdog.start()

    async def stop_watchdog(sender: Any, *args: Any, signal: Any = None, **kwargs: Any) -> None:
        watchdog.halt.set()  # a graceful stop is not a stuck worker

    app.on_before_shutdown.connect(stop_watchdog)  # type: ignore[arg-type]

    @app.timer(CHECK_EVERY_S)
    async def check_health() -> None:  # the verdict `slidr health` reads from /metrics (stream/health.py)
        await health.check()

    @app.timer(30.0)
    async def report() -> None:
        log.info("decided %d (degraded %d), dead letters %d, copies %d, failed batch attempts %d, "
                 "commits found past unhandled clicks %d, keys users %d ips %d (evicted early %d)",
                 ips.decided, ips.degraded, users.dead + ips.dead,
                 users.stats.copies + ips.stats.copies, users.failed_attempts + ips.failed_attempts,
                 users.committed_past + ips.committed_past,
                 sum(users.writer.count.values()), sum(ips.writer.count.values()),
                 users.writer.evicted + ips.writer.evicted)

    app.slidr_stages = (users, ips)  # type: ignore[attr-defined]
    return app


class ModelSwap:
    """Hot swap: the registry's ACTIVE version is checked every ``model_poll_s``; a new one is loaded (in a thread)
    and verified (``load_model``: file hashes, feature spec), then the IP stage scores with it from its next batch
    on (the stage takes ``self.model`` once per batch). A model that fails to load is refused, logged once, and
    the current one stays."""

    def __init__(self, s: Settings, stage: IpStage) -> None:
        self.s = s
        self.stage = stage
        self.refused: str | None = None

    async def check(self) -> None:
        try:
            folder = active_model_dir(self.s.registry_path)
        except Exception as e:  # no pointer or a bad one: keep scoring with what we have
            if self.refused != str(e):
                log.error("registry ACTIVE unreadable (%s): keeping model %s", e, self.stage.model.version)
                self.refused = str(e)
            return
        version = folder.name
        if version == self.stage.model.version or version == self.refused:
            return
        try:
            new = await asyncio.to_thread(load_model, folder, self.s.onnx_providers)
        except Exception as e:
            log.error("refusing model %s (%s): keeping model %s", version, e, self.stage.model.version)
            metrics.MODEL_SWAPS.labels("refused").inc()
            self.refused = version
            return
        old, self.stage.model = self.stage.model.version, new
        self.refused = None
        metrics.set_active(new.version)
        metrics.MODEL_SWAPS.labels("switched").inc()
        log.warning("model switched from %s to %s (on %s)", old, new.version, new.provider)


def run_worker(s: Settings, *, model_dir: Path | None = None, data_dir: Path | None = None,
               loglevel: str = "info", wiring: Wiring | None = None) -> None:
    """Create missing topics, build the app and run a Faust worker until stopped (``wiring``: a replay agent's
    topics, see ``stream.replay``)."""
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
    app = create_app(s, model_dir=model_dir, data_dir=data_dir, wiring=wiring)
    metrics.start(s.metrics_port, s.metrics_bind)
    worker = Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    # Faust's terminal spinner sets the root logger to DEBUG (to spin on every record) whenever loglevel >=
    # WARN: aiokafka and Faust then build a debug record per message sent, ~12% of the worker's time.
    worker.spinner = None
    worker.execute_from_commandline()
