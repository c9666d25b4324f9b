"""Helpers of the stream integration tests: start a real worker process, produce, read topics back."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from schemas.events import Click
from slidr.settings import Settings


def worker_env(s: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "SLIDR_TOPIC_PREFIX": s.topic_prefix, "SLIDR_WORKER_ID": s.worker_id, "SLIDR_PARTITIONS": str(s.partitions),
        "SLIDR_REDIS_KEY_PREFIX": s.redis_key_prefix, "SLIDR_HOME": str(s.home),
        "SLIDR_REGISTRY_PATH": str(s.registry_path), "SLIDR_WORKER_WEB_PORT": "0",
        "SLIDR_KAFKA_BOOTSTRAP": s.kafka_bootstrap, "SLIDR_REDIS_URL": s.redis_url,
        "SLIDR_SCORE_BATCH_SIZE": str(s.score_batch_size), "SLIDR_SCORE_BATCH_WITHIN_S": str(s.score_batch_within_s),
        "SLIDR_SWEEP_KEYS_PER_CLICK": str(s.sweep_keys_per_click), "SLIDR_COMBO_SHARDS": str(s.combo_shards),
    })
    return env


def start_worker(s: Settings, data_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    """``slidr worker`` as a child process (so a test can SIGKILL it)."""
    f = log.open("ab")
    level = os.environ.get("SLIDR_TEST_WORKER_LOGLEVEL", "warning")  # (info: the worker's 30 s report lines too)
    return subprocess.Popen(
        [sys.executable, "-m", "slidr", "worker", "--data-dir", str(data_dir), "--loglevel", level],
        env=worker_env(s), stdout=f, stderr=subprocess.STDOUT,
    )


def stop(p: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


async def produce(s: Settings, topic: str, clicks: Iterable[Click], junk: Iterable[bytes] = ()) -> None:
    """Send clicks keyed by user key (per-user order preserved) plus raw junk messages."""
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(linger_ms=5, max_batch_size=256 * 1024, **s.kafka_client_kwargs())
    await p.start()
    try:
        futs = [await p.send(topic, key=c.user_key.encode(), value=c.to_json()) for c in clicks]
        futs += [await p.send(topic, key=b"junk", value=j) for j in junk]
        await asyncio.gather(*futs)
    finally:
        await p.stop()


async def read_until(s: Settings, topics: list[str], done: Callable[[dict[str, list[Any]]], bool],
                     timeout_s: float, on_tick: Callable[[], None] | None = None) -> dict[str, list[Any]]:
    """Read topics from the beginning until ``done(records)`` or the timeout; records are aiokafka messages."""
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(*topics, group_id=None, auto_offset_reset="earliest", enable_auto_commit=False,
                         **s.kafka_client_kwargs())
    await c.start()
    out: dict[str, list[Any]] = {t: [] for t in topics}
    t_end = time.monotonic() + timeout_s
    try:
        while time.monotonic() < t_end:
            batch = await c.getmany(timeout_ms=300, max_records=20_000)
            for tp, msgs in batch.items():
                out[tp.topic].extend(msgs)
            if on_tick is not None:
                on_tick()
            if done(out):
                break
    finally:
        await c.stop()
    return out


async def read_partitions(s: Settings, topic: str, timeout_s: float = 5.0) -> dict[int, list[Any]]:
    """Every message of a topic, per partition, in log order."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **s.kafka_client_kwargs())
    await c.start()
    try:
        parts = list(range(s.partitions))  # every data / internal topic has settings.partitions partitions
        tps = [TopicPartition(topic, p) for p in parts]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        ends = await c.end_offsets(tps)
        out: dict[int, list[Any]] = {p: [] for p in parts}
        t_end = time.monotonic() + timeout_s
        while time.monotonic() < t_end and any(len(out[tp.partition]) < ends[tp] for tp in tps):
            batch = await c.getmany(timeout_ms=300, max_records=20_000)
            for tp, msgs in batch.items():
                out[tp.partition].extend(msgs)
        return out
    finally:
        await c.stop()


async def committed_offsets(s: Settings, group: str, topic: str) -> dict[int, int]:
    """The group's committed offset per partition of ``topic`` (partitions without one left out): the admin API."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**s.kafka_client_kwargs())
    await admin.start()
    try:
        got = await admin.list_consumer_group_offsets(group)
        return {tp.partition: meta.offset for tp, meta in got.items() if tp.topic == topic and meta.offset >= 0}
    finally:
        await admin.close()


async def group_members(s: Settings, group: str) -> int:
    """How many members the consumer group has now (the admin API's DescribeGroups)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**s.kafka_client_kwargs())
    await admin.start()
    try:
        resp = await admin.describe_consumer_groups([group])
        return sum(len(g[5]) for r in resp for g in r.groups)
    finally:
        await admin.close()


async def end_offsets(s: Settings, topic: str) -> dict[int, int]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **s.kafka_client_kwargs())
    await c.start()
    try:
        ends = await c.end_offsets([TopicPartition(topic, p) for p in range(s.partitions)])
        return {tp.partition: o for tp, o in ends.items()}
    finally:
        await c.stop()


def wait_committed(s: Settings, group: str, topic: str, timeout_s: float,
                   alive: Callable[[], bool] = lambda: True) -> tuple[dict[int, int], dict[int, int]]:
    """Poll until the group has committed the end of every partition of ``topic`` (or the timeout, or ``alive()``
    turns false); return (committed, end offsets) as last seen."""
    ends = asyncio.run(end_offsets(s, topic))
    want = {p: o for p, o in ends.items() if o > 0}
    t_end = time.monotonic() + timeout_s
    got: dict[int, int] = {}
    while time.monotonic() < t_end and alive():
        got = asyncio.run(committed_offsets(s, group, topic))
        if all(got.get(p) == o for p, o in want.items()):
            break
        time.sleep(0.5)
    return got, want


async def produce_raw(s: Settings, topic: str, records: Iterable[tuple[bytes | None, bytes]]) -> None:
    """Send (key, value) records as they are."""
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(linger_ms=5, max_batch_size=256 * 1024, **s.kafka_client_kwargs())
    await p.start()
    try:
        futs = [await p.send(topic, key=k, value=v) for k, v in records]
        await asyncio.gather(*futs)
    finally:
        await p.stop()
