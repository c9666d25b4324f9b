"""The local services and topics, against the real broker and redis-server."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import orjson
import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from schemas import decode_click
from slidr import services
from slidr.topics import topic_specs
from tests.conftest import KEnv

pytestmark = pytest.mark.integration


def test_topics_are_created_idempotently(kenv: KEnv) -> None:
    s = kenv.settings
    assert services.create_topics(s) == []  # the fixture created them already

    async def partitions() -> dict[str, int]:
        admin = AIOKafkaAdminClient(**s.kafka_client_kwargs())
        await admin.start()
        try:
            meta = await admin.describe_topics([t.name for t in topic_specs(s)])
            return {m["topic"]: len(m["partitions"]) for m in meta}
        finally:
            await admin.close()

    assert asyncio.run(partitions()) == {t.name: t.partitions for t in topic_specs(s)}


def test_click_round_trip_through_the_broker(kenv: KEnv) -> None:
    s = kenv.settings
    sent = [
        orjson.dumps(dict(click_id=f"c{i}", ts=1_762_000_000_000 + i, ip="198.51.100.1", session_id=f"s{i % 7}",
                          platform="app", ad_id="a", campaign_id="k", advertiser_id="adv"))
        for i in range(200)
    ]

    async def go() -> list[bytes]:
        prod = AIOKafkaProducer(**s.kafka_client_kwargs(), acks="all")
        await prod.start()
        try:
            for i, v in enumerate(sent):
                await prod.send(kenv.topics.clicks, v, key=f"s{i % 7}".encode())
            await prod.flush()
        finally:
            await prod.stop()
        cons = AIOKafkaConsumer(kenv.topics.clicks, **s.kafka_client_kwargs(), group_id=kenv.group,
                                auto_offset_reset="earliest", enable_auto_commit=False)
        await cons.start()
        got: list[bytes] = []
        try:
            while len(got) < len(sent):
                batch = await asyncio.wait_for(cons.getmany(timeout_ms=1000), 30)
                got += [m.value for msgs in batch.values() for m in msgs if m.value is not None]
        finally:
            await cons.stop()
        return got

    got = asyncio.run(go())
    assert sorted(got) == sorted(sent)
    assert {decode_click(v).click_id for v in got} == {f"c{i}" for i in range(200)}


def test_redis_read_write(kenv: KEnv) -> None:
    s = kenv.settings
    r = redis.Redis.from_url(s.redis_url, **s.redis_kwargs())
    key = f"{kenv.prefix}:profile:cust-1"
    r.hset(key, mapping={"rfm_score": "0.8", "account_age_days": "400"})
    assert r.hgetall(key) == {b"rfm_score": b"0.8", b"account_age_days": b"400"}


def test_status_and_second_up_are_no_ops(services: object) -> None:
    def slidr(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "slidr", *args], capture_output=True, text=True, timeout=120)

    st = slidr("status")
    assert st.returncode == 0, st.stdout + st.stderr
    assert "kafka: running" in st.stdout and "redis: running" in st.stdout
    pids = [line.split("pid=")[1].split()[0] for line in st.stdout.splitlines()]
    again = slidr("up")
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stderr
    assert [line.split("pid=")[1].split()[0] for line in slidr("status").stdout.splitlines()] == pids
