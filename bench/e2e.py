"""End-to-end throughput of one worker (clicks in -> decisions out) against two ceilings on the same broker.

All run over the same pre-loaded clicks: the worker consumes a backlog of ``n`` clicks and we time first ->
last decision (worker start-up excluded). Ceilings: a raw aiokafka passthrough consumes the same clicks and
produces each one unchanged to another topic (one consumer + one producer, no decoding); a bare Faust agent
(``bench/faust_bare.py``) consumes them and does nothing, which no Faust worker can beat; it runs once with our
Faust patches and settings and once as released (``stock``). Topics get a unique
prefix and are deleted afterwards. ``n`` is 100,000 by default: the bare agent needs a few seconds of
clicks to measure a steady rate. ``slidr bench e2e [--set n=20000]``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
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
    env.update({"SLIDR_TOPIC_PREFIX": s.topic_prefix, "SLIDR_WORKER_ID": s.worker_id,
                "SLIDR_REDIS_KEY_PREFIX": s.redis_key_prefix, "SLIDR_HOME": str(s.home),
                "SLIDR_REGISTRY_PATH": str(s.registry_path), "SLIDR_WORKER_WEB_PORT": "0"})
    return env


def start_worker(s: Settings, tmp: Path) -> subprocess.Popen[bytes]:
    from stream import toymodel

    toymodel.build_registry(s.registry_path, version="toy-bench")
    return subprocess.Popen([sys.executable, "-m", "slidr", "worker", "--loglevel", "warning"],
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


async def consume_count(s: Settings, topic: str, n: int, timeout_s: float) -> list[Any]:
    """Read ``topic`` from the start until ``n`` distinct keys arrived; return the messages."""
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(topic, group_id=None, auto_offset_reset="earliest", **s.kafka_client_kwargs())
    await c.start()
    msgs: list[Any] = []
    keys: set[bytes] = set()
    t_end = time.monotonic() + timeout_s
    try:
        while len(keys) < n and time.monotonic() < t_end:
            for batch in (await c.getmany(timeout_ms=200, max_records=50_000)).values():
                msgs.extend(batch)
                keys.update(m.key for m in batch)
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


def faust_bare(s: Settings, topic: str, n: int, timeout_s: float, stock: bool = False) -> dict[str, Any]:
    """Run bench/faust_bare.py over ``topic`` in its own process (``stock``: Faust as released); its result."""
    import orjson

    cmd = [sys.executable, "-m", "bench.faust_bare", topic, str(n)] + (["--stock"] if stock else [])
    out = subprocess.run(cmd, env=worker_env(s),
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


def run(n: int = 100_000, timeout_s: float = 300.0, **opts: Any) -> dict[str, Any]:
    from slidr.services import create_topics_async
    from slidr.topics import TopicSpec
    from stream.synth import traffic

    with bench_topics("e2e") as (s, t, tmp):
        asyncio.run(create_topics_async(s, [TopicSpec(f"{s.topic_prefix}.passthrough", s.partitions, "")]))
        clicks = traffic(n, seed=7)
        asyncio.run(produce(s, t.clicks, keyed(clicks)))
        ceiling_s = asyncio.run(passthrough(s, t.clicks, f"{s.topic_prefix}.passthrough", n))
        bare = faust_bare(s, t.clicks, n, timeout_s)
        stock = faust_bare(s, t.clicks, n, timeout_s, stock=True)
        with running_worker(s, tmp):
            msgs = asyncio.run(consume_count(s, t.decisions, n, timeout_s))
        decided = len({m.key for m in msgs})
        ts = sorted(m.timestamp for m in msgs)  # producer CreateTime of each decision, ms
        span_s = max((ts[-1] - ts[0]) / 1000.0, 1e-3) if ts else float("nan")
    if not decided:
        raise RuntimeError("the worker decided nothing (see its log: run with a smaller n to debug)")
    worker_rate = decided / span_s
    ceiling_rate = n / ceiling_s
    return {"clicks": n, "decided": decided, "partitions": s.partitions, "cpu_cores": os.cpu_count(),
            "worker_clicks_per_s": round(worker_rate), "worker_first_to_last_decision_s": round(span_s, 2),
            "passthrough_clicks_per_s": round(ceiling_rate), "ratio_to_ceiling": round(worker_rate / ceiling_rate, 3),
            "faust_bare_agent_clicks_per_s": bare["events_per_s"],
            "faust_bare_agent_cpu_us_per_click": bare["cpu_us_per_event"],
            "ratio_to_faust_bare": round(worker_rate / bare["events_per_s"], 3),
            "faust_bare_agent_stock_clicks_per_s": stock["events_per_s"],
            "faust_bare_agent_stock_cpu_us_per_click": stock["cpu_us_per_event"]}


def max_throughput(max_n: int, timeout_s: float) -> dict[str, Any]:
    """bench/e2e.py's worker measurement: a backlog of ``max_n`` clicks, a fresh worker, decided / span."""
    from stream.synth import traffic

    with bench_topics("soakmax") as (s, t, tmp):
        asyncio.run(produce(s, t.clicks, keyed(traffic(max_n, seed=7))))
        with running_worker(s, tmp):
            msgs = asyncio.run(consume_count(s, t.decisions, max_n, timeout_s))
    decided = len({m.key for m in msgs})
    if decided < 2:
        raise RuntimeError("the max-throughput probe decided nothing (worker log: run bench e2e with a small n)")
    ts = sorted(m.timestamp for m in msgs)
    span_s = max((ts[-1] - ts[0]) / 1000.0, 1e-3)
    return {"max_probe_clicks": max_n, "max_probe_decided": decided, "max_probe_span_s": round(span_s, 2),
            "max_clicks_per_s": round(decided / span_s)}
