"""The local services and topics, against the real broker and redis-server."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from schemas import decode_click
from slidr import services
from slidr.settings import Settings
from slidr.topics import topic_specs
from tests.conftest import KEnv

ROOT = Path(__file__).resolve().parents[2]
OutsideRedis = tuple[Callable[..., subprocess.Popen[bytes]], int]
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


# --- services another instance started ------------------------------------------------------


@pytest.fixture
def outside_redis(tmp_path: Path) -> Iterator[OutsideRedis]:
    """(start, port): ``start(*config_lines)`` runs a redis-server on the free ``port`` outside the scripts, as
    another checkout would; it is stopped afterwards."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    procs: list[subprocess.Popen[bytes]] = []

    def start(*conf: str) -> subprocess.Popen[bytes]:
        cfg = tmp_path / "outside.conf"
        cfg.write_text("".join(f"{line}\n" for line in conf))
        p = subprocess.Popen(["redis-server", str(cfg), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                              "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
        procs.append(p)
        for _ in range(100):  # until it accepts connections (or died)
            if p.poll() is not None or services.port_open(port):
                break
            time.sleep(0.05)
        assert p.poll() is None and services.port_open(port), "redis-server did not start"
        return p

    yield start, port
    for p in procs:
        p.terminate()
        p.wait(10)


def _other_instance_env(tmp_path: Path, services_settings: Settings, redis_port: int) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("SLIDR_")},
        "SLIDR_HOME": str(tmp_path / "other-home"),  # no pid files: nothing here was started by this instance
        "SLIDR_CACHE_DIR": str(ROOT / ".cache"),
        "SLIDR_KAFKA_BOOTSTRAP": services_settings.kafka_bootstrap,  # the shared broker, also not ours
        "SLIDR_KAFKA_CONTROLLER_PORT": str(services_settings.kafka_controller_port),
        "SLIDR_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
    }


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "slidr", *args], env=env, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_services_another_instance_started_count_as_running(services: Settings, outside_redis: OutsideRedis,
                                                            tmp_path: Path) -> None:
    start, port = outside_redis
    proc = start()
    env = _other_instance_env(tmp_path, services, port)

    st = _run(env, "status")
    assert st.returncode == 0, st.stdout + st.stderr
    lines = dict(line.split(":", 1) for line in st.stdout.splitlines())
    assert lines["redis"].startswith(f" running pid={proc.pid} url=redis://127.0.0.1:{port}/0")
    assert lines["kafka"].startswith(" running pid=")
    assert all("not started by this instance" in line for line in lines.values())

    up = _run(env, "up", "--no-topics")
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"[redis] already running on url=redis://127.0.0.1:{port}/0 (pid {proc.pid}), started by another " \
           "instance" in up.stderr
    assert not (tmp_path / "other-home" / "redis").exists()  # no second redis-server was tried

    down = _run(env, "down")
    assert down.returncode == 0 and "left running" in down.stderr
    assert proc.poll() is None and redis.Redis(port=port).ping()


def test_up_names_the_pid_holding_a_port(services: Settings, outside_redis: OutsideRedis, tmp_path: Path) -> None:
    start, port = outside_redis
    proc = start("requirepass not-ours")  # answers, but not to these settings (no password)
    env = _other_instance_env(tmp_path, services, port)

    up = _run(env, "up")
    assert up.returncode == 1
    assert "Traceback" not in up.stderr, up.stderr
    assert f"slidr up: redis's plain port 127.0.0.1:{port} is taken by another instance or program: " \
           f"pid {proc.pid} (redis-server)" in up.stderr
    assert "not-ours" not in up.stdout + up.stderr

    st = _run(env, "status")
    assert st.returncode == 3
    assert f"redis: stopped; redis's plain port 127.0.0.1:{port} is taken" in st.stdout
