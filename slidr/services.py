"""Local services (Kafka broker, redis-server) and topic management.

The mechanics live in the shell scripts under ``deploy/local/``; this module runs them with the values from
:class:`~slidr.settings.Settings` and adds the checks that need a client: a real metadata request to the broker,
a PING to Redis, and idempotent topic creation.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

from slidr.settings import Settings
from slidr.topics import TopicSpec, topic_specs

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "local"
SERVICES = ("kafka", "redis")


class ServiceError(RuntimeError):
    pass


def _env(s: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "SLIDR_HOME": str(s.home.resolve()),
        "SLIDR_CACHE_DIR": str(s.cache_dir.resolve()),
        "SLIDR_KAFKA_VERSION": s.kafka_version,
        "SLIDR_KAFKA_PORT": str(s.kafka_port),
        "SLIDR_KAFKA_CONTROLLER_PORT": str(s.kafka_controller_port),
        "SLIDR_KAFKA_HEAP": s.kafka_heap,
        "SLIDR_REDIS_PORT": str(s.redis_port),
    }


def run_script(service: str, action: str, s: Settings, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``deploy/local/<service>.sh <action>``; its progress goes to stderr, its answer to stdout."""
    proc = subprocess.run(
        ["bash", str(DEPLOY / f"{service}.sh"), action],
        env=_env(s), stdout=subprocess.PIPE, stderr=None, text=True, check=False,
    )
    if check and proc.returncode != 0:
        raise ServiceError(f"{service} {action} failed (exit {proc.returncode})")
    return proc


async def _kafka_metadata(s: Settings, timeout_s: float) -> list[str]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**s.kafka_client_kwargs(), request_timeout_ms=int(timeout_s * 1000))
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        return sorted(await asyncio.wait_for(admin.list_topics(), timeout_s))
    finally:
        await admin.close()


def wait_kafka(s: Settings, timeout_s: float = 60.0) -> list[str]:
    """Block until the broker answers a metadata request; return its topic names."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return asyncio.run(_kafka_metadata(s, 5.0))
        except Exception as e:  # broker still starting: connection refused, no controller yet, ...
            last = e
            time.sleep(0.5)
    raise ServiceError(f"Kafka at {s.kafka_bootstrap} did not answer a metadata request: {last!r}")


def ping_redis(s: Settings) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(s.redis_url, socket_timeout=2, **s.redis_kwargs()).ping())
    except redis.RedisError:
        return False


def up(s: Settings) -> None:
    run_script("redis", "up", s)
    run_script("kafka", "up", s)
    wait_kafka(s)
    if not ping_redis(s):
        raise ServiceError(f"redis at {s.redis_url} does not answer PING")


def down(s: Settings) -> None:
    for svc in reversed(SERVICES):
        run_script(svc, "down", s)


def status(s: Settings) -> dict[str, str]:
    return {svc: run_script(svc, "status", s, check=False).stdout.strip() for svc in SERVICES}


async def create_topics_async(s: Settings, specs: list[TopicSpec]) -> list[str]:
    """Create the topics that do not exist yet; return the names created (idempotent)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(**s.kafka_client_kwargs())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        todo = [t for t in specs if t.name not in existing]
        if todo:
            await admin.create_topics(
                [NewTopic(t.name, t.partitions, s.replication_factor, topic_configs=dict(t.config)) for t in todo]
            )
        # wait until the new topics have leaders, so producers and Faust workers find them at once
        for _ in range(100):
            meta = await admin.describe_topics([t.name for t in todo]) if todo else []
            if all(m.get("error_code", 0) == 0 and m.get("partitions") for m in meta):
                break
            await asyncio.sleep(0.1)
        return [t.name for t in todo]
    finally:
        await admin.close()


def create_topics(s: Settings, prefix: str | None = None) -> list[str]:
    return asyncio.run(create_topics_async(s, topic_specs(s, prefix)))


async def drop_topics_async(s: Settings, prefix: str) -> list[str]:
    """Delete every topic whose name starts with ``prefix`` (a test's or a demo run's); return them."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**s.kafka_client_kwargs())
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if names:
            await admin.delete_topics(names)
        return names
    finally:
        await admin.close()


def drop_topics(s: Settings, prefix: str) -> list[str]:
    return asyncio.run(drop_topics_async(s, prefix))
