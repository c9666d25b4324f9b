"""Fixtures of the deployment tests: the container engine with the images built, a broker of the test's own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from slidr.settings import Settings
from tests.deploy.engine import Engine, free_port, script, start_engine_and_build


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    """The local engine with the worker image built (cached: seconds when nothing changed); stopped at the end
    when this session started it."""
    eng, started = start_engine_and_build()
    yield eng
    if started:
        script("deploy/docker/engine.sh", "stop")


@pytest.fixture
def own_broker(services: Settings, tmp_path: Path) -> Iterator[Settings]:
    """A Kafka broker of this test's own (so that it can stop it), with the session's redis-server."""
    from slidr import services as svc

    s = services.model_copy(update={
        "kafka_bootstrap": f"127.0.0.1:{free_port()}", "kafka_controller_port": free_port(),
        "home": tmp_path / "svc", "kafka_heap": "-Xmx512m -Xms256m"})
    svc.up(s)
    try:
        yield s
    finally:
        svc.down(s)
