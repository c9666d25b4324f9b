"""End-to-end throughput of one worker (clicks in -> decisions out) against two ceilings and a peer on the same broker.

All run over the same pre-loaded clicks: the worker consumes a backlog of ``n`` clicks and we time first ->
last decision (worker start-up excluded). Ceilings: a raw aiokafka passthrough consumes the same clicks and
produces each one unchanged to another topic (one consumer + one producer, no decoding); a bare Faust agent
(``bench/faust_bare.py``) consumes them and does nothing, which no Faust worker can beat; it runs once with our
Faust patches and settings and once as released (``stock``). The peer (``bench/peer.py``, issue 21) does the
worker's job in Quix Streams over the same clicks (the project's decoder, feature and scoring functions; its
module doc says where it differs); it needs the ``dev`` extra and is skipped with the reason without it
(``--set peer=false`` skips it too). Topics get a unique prefix and are deleted afterwards. ``n`` is 100,000 by
default: the bare agent needs a few seconds of clicks to measure a steady rate. ``slidr bench e2e [--set
n=20000]`` (``slidr bench peer`` is the same run).

The backlog goes on past the ``n`` clicks timed: ``tail`` more clicks follow them (default: ``backlog_tail(n)``),
and each participant still times ``n`` clicks (the passthrough and the bare agents ``n`` messages, the peer and the
worker ``n`` decisions; the worker's count ends with the fetch that brings the ``n``-th: ``decided``). A stream
that stops holds its last clicks in the worker's IP stage until its inputs count as idle (``watermark_idle_s``,
5 s: the IP stage's watermark in docs/design.md), which live traffic never does. Without the tail that hold was
part of every worker figure: at 30,000 clicks the last 2,300 (8%) waited 4.7 s, a third of the run.

Rates: ``worker_clicks_per_s`` is the worker's first -> last decision (decisions' CreateTime), as before. The
peer and the bare agent time their first click in -> ``n``-th click out, so the worker is also timed that way
(``worker_clicks_per_s_from_first_click``: from its first by-ip record, the end of its first user-stage batch,
to its last decision) and ``ratio_to_peer`` compares those two: the time to a backlog's last decision. Both take a
while (seconds, at 50,000 clicks) from their first click to their first decision (``*_first_decision_after_s``),
so the first-to-last-decision rates (``worker_clicks_per_s``, ``peer_clicks_per_s_decision_span``, their ratio
``ratio_to_peer_decision_span``) leave part of the work out of the window.

CPU per click: the bare agent and the peer measure their own process (``time.process_time``, every thread) from
their first click in to their ``n``-th click out. The worker's is read from ``/proc/<pid>/stat`` (user + system
time of the worker process, every thread: Faust, aiokafka, RocksDB, onnxruntime, the Redis client) each time the
bench's reader of the decisions topic gets decisions: the CPU between the first such reading and the last,
over the decisions that came in between (start-up, rebalance and the first decisions' share excluded; not the
broker's or Redis' own CPU, for none of the three). Rates are per process; the machine's other load and the
three's order make them noisy: compare within one run.

Profile: ``SLIDR_BENCH_PROFILE=FILE slidr bench e2e --set peer=false`` runs the worker under pyinstrument (dev
extra) and writes its call tree (text, every frame) to FILE when the worker stops; the sampling slows the worker
about 2x, so its rates in that run are not figures.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from slidr.settings import Settings
from slidr.topics import Topics


def bench_settings(tag: str, tmp: Path) -> Settings:
    prefix = f"bench-{tag}-{uuid.uuid4().hex[:8]}"
    return Settings().model_copy(update={
        "topic_prefix": prefix, "worker_id": f"{prefix}-group", "redis_key_prefix": prefix,
        "home": tmp / "home", "registry_path": tmp / "registry", "worker_web_port": 0,
    })


def worker_env(s: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"SLIDR_KAFKA_BOOTSTRAP": s.kafka_bootstrap, "SLIDR_PARTITIONS": str(s.partitions),
                "SLIDR_TOPIC_PREFIX": s.topic_prefix, "SLIDR_WORKER_ID": s.worker_id,
                "SLIDR_REDIS_KEY_PREFIX": s.redis_key_prefix, "SLIDR_HOME": str(s.home),
                "SLIDR_REGISTRY_PATH": str(s.registry_path), "SLIDR_WORKER_WEB_PORT": "0",
                "SLIDR_METRICS_PORT": str(s.metrics_port)})
    return env


def start_worker(s: Settings, tmp: Path) -> subprocess.Popen[bytes]:
    from stream import toymodel

    toymodel.build_registry(s.registry_path, version="toy-bench")
    prof = os.environ.get("SLIDR_BENCH_PROFILE")  # a path: the worker runs under pyinstrument (text report there)
    pre = ["-m", "pyinstrument", "--renderer", "text", "--show-all", "-o", prof] if prof else []
    return subprocess.Popen([sys.executable, *pre, "-m", "slidr", "worker", "--loglevel", "warning"],
                            env=worker_env(s), stdout=(tmp / "worker.log").open("wb"), stderr=subprocess.STDOUT)


def stop_worker(p: subprocess.Popen[bytes]) -> None:
    p.terminate()
    try:
        p.wait(20)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


@contextmanager
def bench_topics(tag: str) -> Iterator[tuple[Settings, Topics, Path]]:
    """A temporary folder, settings with a unique topic prefix, and the worker's topics (deleted afterwards)."""
    from stream.app import ensure_topics

    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        s = bench_settings(tag, tmp)
        try:
            asyncio.run(ensure_topics(s))
            yield s, Topics(s.topic_prefix), tmp
        finally:
            asyncio.run(drop_topics(s))


@contextmanager
def running_worker(s: Settings, tmp: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``slidr worker`` (toy model) as a child process for the block's length."""
    w = start_worker(s, tmp)
    try:
        yield w
    finally:
        stop_worker(w)


def backlog_tail(n: int) -> int:
    """Clicks sent after a timed backlog of ``n`` (see the module doc): more than the IP stage holds at a time
    on a backlog (up to ~1,800 a by-ip partition, four of them, measured at 30,000 clicks)."""
    return max(10_000, n // 5)


def backlog(n: int, tail: int | None = None) -> list[Any]:
    """The benches' backlog: ``n`` clicks to time, then ``tail`` more (default ``backlog_tail(n)``)."""
    from stream.synth import traffic

    return traffic(n + (backlog_tail(n) if tail is None else tail), seed=7)


def keyed(clicks: list[Any]) -> list[tuple[bytes, bytes]]:
    """(user key, wire bytes) pairs, as producers send clicks."""
    return [(c.user_key.encode(), c.to_json()) for c in clicks]


async def produce(s: Settings, topic: str, payloads: list[tuple[bytes, bytes]], rate: float | None = None) -> float:
    """Send (key, value) pairs, paced at ``rate`` per second if given; return the seconds it took."""
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(linger_ms=2, max_batch_size=512 * 1024, **s.kafka_client_kwargs())
    await p.start()
    t0 = time.perf_counter()
    try:
        futs = []
        for i, (k, v) in enumerate(payloads):
            if rate is not None and i % 50 == 0:  # pace in small bursts of 50
                ahead = t0 + i / rate - time.perf_counter()
                if ahead > 0:
                    await asyncio.sleep(ahead)
            futs.append(await p.send(topic, key=k, value=v))
        await asyncio.gather(*futs)
    finally:
        await p.stop()
    return time.perf_counter() - t0


async def consume_count(s: Settings, topic: str, n: int, timeout_s: float,
                        on_batch: Callable[[int], None] | None = None) -> list[Any]:
    """Read ``topic`` from the start until ``n`` distinct keys arrived; return the messages. ``on_batch(keys)``
    after each fetch that brought messages (the distinct keys so far)."""
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(topic, group_id=None, auto_offset_reset="earliest", **s.kafka_client_kwargs())
    await c.start()
    msgs: list[Any] = []
    keys: set[bytes] = set()
    t_end = time.monotonic() + timeout_s
    try:
        while len(keys) < n and time.monotonic() < t_end:
            got = False
            for batch in (await c.getmany(timeout_ms=200, max_records=50_000)).values():
                msgs.extend(batch)
                keys.update(m.key for m in batch)
                got = got or bool(batch)
            if got and on_batch is not None:
                on_batch(len(keys))
    finally:
        await c.stop()
    return msgs


async def passthrough(s: Settings, src: str, dst: str, n: int) -> float:
    """Consume ``n`` messages and produce each unchanged to ``dst``: the ceiling. Returns seconds."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    c = AIOKafkaConsumer(src, group_id=f"{s.topic_prefix}-passthrough", auto_offset_reset="earliest",
                         **s.kafka_client_kwargs())
    p = AIOKafkaProducer(linger_ms=2, max_batch_size=512 * 1024, **s.kafka_client_kwargs())
    await c.start()
    await p.start()
    seen, t0 = 0, None
    try:
        while seen < n:
            for batch in (await c.getmany(timeout_ms=200, max_records=10_000)).values():
                if t0 is None:
                    t0 = time.perf_counter()
                for m in batch:
                    await p.send(dst, key=m.key, value=m.value)
                seen += len(batch)
        await p.flush()
        return time.perf_counter() - (t0 or time.perf_counter())
    finally:
        await c.stop()
        await p.stop()


async def first_timestamp_ms(s: Settings, topic: str, timeout_s: float = 10.0) -> int | None:
    """The earliest record timestamp of ``topic`` (``s.partitions`` partitions, the first record of each; None:
    it is empty)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **s.kafka_client_kwargs())
    await c.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(s.partitions)]
        ends = await c.end_offsets(tps)
        todo = {tp for tp in tps if ends[tp] > 0}
        first: list[int] = []
        if todo:
            c.assign(list(todo))
            await c.seek_to_beginning(*todo)
        t_end = time.monotonic() + timeout_s
        while todo and time.monotonic() < t_end:
            for tp, batch in (await c.getmany(*todo, timeout_ms=200, max_records=1)).items():
                if batch and tp in todo:
                    first.append(batch[0].timestamp)
                    todo.discard(tp)
                    c.pause(tp)
        return min(first) if first else None
    finally:
        await c.stop()


def free_port() -> int:
    """A TCP port free on loopback now (a worker's /metrics)."""
    import socket

    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        return int(so.getsockname()[1])


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process so far, all its threads (``/proc/<pid>/stat``; None without it)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14 and 15
    except (OSError, ValueError, IndexError):
        return None


def cpu_per_click_us(marks: list[tuple[int, float | None]]) -> float | None:
    """CPU microseconds per decision between the first and the last (decisions seen, process CPU) reading."""
    if len(marks) < 2 or marks[0][1] is None or marks[-1][1] is None or marks[-1][0] <= marks[0][0]:
        return None
    return round(1e6 * (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0]), 1)


def faust_bare(s: Settings, topic: str, n: int, timeout_s: float, stock: bool = False,
               tmp: Path | None = None) -> dict[str, Any]:
    """Run bench/faust_bare.py over ``topic`` in its own process (``stock``: Faust as released); its result.
    ``tmp``: its temporary folders go there (it exits without removing its data folder)."""
    import orjson

    cmd = [sys.executable, "-m", "bench.faust_bare", topic, str(n)] + (["--stock"] if stock else [])
    out = subprocess.run(cmd, env={**worker_env(s), **({"TMPDIR": str(tmp)} if tmp else {})},
                         capture_output=True, timeout=timeout_s)
    for line in out.stdout.decode().splitlines()[::-1]:
        if line.startswith("{"):
            return dict(orjson.loads(line))
    raise RuntimeError(f"bench.faust_bare printed no result (rc {out.returncode}): {out.stderr.decode()[-2000:]}")


async def drop_topics(s: Settings) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**s.kafka_client_kwargs())
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(s.topic_prefix)]
        if names:
            await admin.delete_topics(names)
    finally:
        await admin.close()


def run(n: int = 100_000, timeout_s: float = 300.0, peer: bool = True, tail: int | None = None,
        **opts: Any) -> dict[str, Any]:
    from bench import peer as quix_peer
    from slidr.services import create_topics_async
    from slidr.topics import TopicSpec
    from stream import toymodel

    with bench_topics("e2e") as (s, t, tmp):
        asyncio.run(create_topics_async(s, [TopicSpec(f"{s.topic_prefix}.passthrough", s.partitions, "")]))
        clicks = backlog(n, None if tail is None else int(tail))
        tail = len(clicks) - n
        asyncio.run(produce(s, t.clicks, keyed(clicks)))
        ceiling_s = asyncio.run(passthrough(s, t.clicks, f"{s.topic_prefix}.passthrough", n))
        bare = faust_bare(s, t.clicks, n, timeout_s, tmp=tmp)
        stock = faust_bare(s, t.clicks, n, timeout_s, stock=True, tmp=tmp)
        if peer:
            toymodel.build_registry(s.registry_path, version="toy-bench")  # (the model the worker loads)
            quix = quix_peer.measure(s, t.clicks, n, timeout_s, state_dir=str(tmp))
        else:
            quix = {"skipped": "peer=false"}
        marks: list[tuple[int, float | None]] = []  # (decisions seen, the worker's CPU seconds then)
        with running_worker(s, tmp) as w:
            msgs = asyncio.run(consume_count(s, t.decisions, n, timeout_s,
                                             on_batch=lambda k: marks.append((k, process_cpu_s(w.pid)))))
        # the worker's first by-ip record: the end of its first user-stage batch (its first clicks in)
        first_in = asyncio.run(first_timestamp_ms(s, f"{s.topic_prefix}.by-ip"))
        decided = len({m.key for m in msgs})
        ts = sorted(m.timestamp for m in msgs)  # producer CreateTime of each decision, ms
        span_s = max((ts[-1] - ts[0]) / 1000.0, 1e-3) if ts else float("nan")
    if not decided:
        raise RuntimeError("the worker decided nothing (see its log: run with a smaller n to debug)")
    worker_rate = decided / span_s
    # first click in -> last decision out, the peer's (and the bare agent's) basis
    worker_rate_in = decided / max((ts[-1] - first_in) / 1000.0, 1e-3) if first_in is not None else None
    ceiling_rate = n / ceiling_s
    worker_cpu = cpu_per_click_us(marks)
    out = {"clicks": n, "tail_clicks": tail, "decided": decided, "partitions": s.partitions,
           "cpu_cores": os.cpu_count(),
           "worker_clicks_per_s": round(worker_rate), "worker_first_to_last_decision_s": round(span_s, 2),
           "worker_clicks_per_s_from_first_click": round(worker_rate_in) if worker_rate_in else None,
           "worker_first_decision_after_s": round((ts[0] - first_in) / 1000.0, 3) if first_in is not None else None,
           "worker_cpu_us_per_click": worker_cpu,
           "passthrough_clicks_per_s": round(ceiling_rate), "ratio_to_ceiling": round(worker_rate / ceiling_rate, 3),
           "faust_bare_agent_clicks_per_s": bare["events_per_s"],
           "faust_bare_agent_cpu_us_per_click": bare["cpu_us_per_event"],
           "ratio_to_faust_bare": round(worker_rate / bare["events_per_s"], 3),
           "worker_cpu_ratio_to_faust_bare": round(worker_cpu / bare["cpu_us_per_event"], 2) if worker_cpu else None,
           "faust_bare_agent_stock_clicks_per_s": stock["events_per_s"],
           "faust_bare_agent_stock_cpu_us_per_click": stock["cpu_us_per_event"]}
    if "skipped" in quix:
        out["peer"] = f"skipped: {quix['skipped']}"
    else:
        out.update({"peer": "quixstreams " + quix_version(),
                    "peer_clicks_per_s": quix["events_per_s"], "peer_cpu_us_per_click": quix["cpu_us_per_event"],
                    "peer_first_decision_after_s": quix["first_decision_after_s"],
                    "peer_clicks_per_s_decision_span": quix["decisions_per_s"],
                    "ratio_to_peer": round((worker_rate_in or worker_rate) / quix["events_per_s"], 3),
                    "ratio_to_peer_decision_span": round(worker_rate / quix["decisions_per_s"], 3),
                    "worker_cpu_ratio_to_peer":
                        round(worker_cpu / quix["cpu_us_per_event"], 2) if worker_cpu else None})
    return out


def quix_version() -> str:
    from importlib.metadata import version

    return version("quixstreams")


def max_throughput(max_n: int, timeout_s: float) -> dict[str, Any]:
    """bench/e2e.py's worker measurement: a backlog of ``max_n`` clicks (and its tail), a fresh worker, decided
    / span once ``max_n`` are decided."""
    with bench_topics("soakmax") as (s, t, tmp):
        asyncio.run(produce(s, t.clicks, keyed(backlog(max_n))))
        with running_worker(s, tmp):
            msgs = asyncio.run(consume_count(s, t.decisions, max_n, timeout_s))
    decided = len({m.key for m in msgs})
    if decided < 2:
        raise RuntimeError("the max-throughput probe decided nothing (worker log: run bench e2e with a small n)")
    ts = sorted(m.timestamp for m in msgs)
    span_s = max((ts[-1] - ts[0]) / 1000.0, 1e-3)
    return {"max_probe_clicks": max_n, "max_probe_decided": decided, "max_probe_span_s": round(span_s, 2),
            "max_clicks_per_s": round(decided / span_s)}
