"""Shared fixtures.

Integration tests run against the real local Kafka broker and redis-server. The session fixture ``services``
reuses ones already answering on the configured addresses, else starts them with the project's own scripts
(``slidr up``) and stops them at the end. Each test that asks for ``kenv`` gets its own topic prefix (so its
own topics), its own consumer group / Faust app id, its own Redis key prefix and its own state folder.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from slidr.settings import Settings
from slidr.topics import Topics

# Material provided beside the checkout (CI clones the repo with shared/ beside it): ``../shared``, or the folder
# named by SLIDR_SHARED_DIR (set it to an empty folder to run the suite as on a bare clone). Tests that need a
# file from it skip with a reason when it is absent (``needs_shared``), so a bare clone's test run still passes.
SHARED = Path(os.environ.get("SLIDR_SHARED_DIR") or Path(__file__).resolve().parents[1].parent / "shared")
TALKINGDATA_CSV = SHARED / "data" / "talkingdata" / "clicks_sample.csv"


def needs_shared(path: Path) -> pytest.MarkDecorator:
    """Skip marker for tests (or a module, as ``pytestmark``) that read ``path`` from the shared folder."""
    return pytest.mark.skipif(not path.is_file(), reason=f"shared material not found: {path} (no ../shared beside "
                              "the checkout, or SLIDR_SHARED_DIR points elsewhere)")


def _answering(s: Settings) -> bool:
    from slidr import services

    if not services.ping_redis(s):
        return False
    try:
        asyncio.run(services._kafka_metadata(s, 3.0))
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def services() -> Iterator[Settings]:
    """Base settings pointing at a live broker and Redis (started here if none answers)."""
    from slidr import services as svc

    s = Settings()
    started: list[str] = []
    if not _answering(s):
        # only what was not running at all is this session's to stop: a broker that was merely slow to answer
        # (a loaded machine) may be another session's, and stopping it broke that session's tests
        was_running = {name: svc.service_state(name, s).running for name in svc.SERVICES}
        svc.up(s)
        started = [name for name, running in was_running.items() if not running]
    yield s
    if started:
        svc.down(s, only=started)


@dataclass
class KEnv:
    """One integration test's isolated slice of the shared broker and Redis."""

    settings: Settings
    topics: Topics
    prefix: str
    group: str
    workdir: Path


@pytest.fixture
def kenv(services: Settings, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KEnv]:
    from slidr.services import create_topics

    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    prefix = f"t-{name}-{uuid.uuid4().hex[:8]}"
    s = services.model_copy(
        update={
            "topic_prefix": prefix,
            "worker_id": f"{prefix}-group",
            "redis_key_prefix": prefix,
            "home": tmp_path / "home",
            "registry_path": tmp_path / "registry",
            "worker_web_port": 0,
        }
    )
    create_topics(s)
    yield KEnv(settings=s, topics=Topics(prefix), prefix=prefix, group=s.worker_id, workdir=tmp_path)
    if os.environ.get("SLIDR_TEST_KEEP_TOPICS") != "1":  # (set it to look at a failed test's topics afterwards)
        _cleanup(s, prefix)


def _cleanup(s: Settings, prefix: str) -> None:
    """Delete this test's topics and Redis keys (best effort: a leftover never fails a test)."""
    import redis

    from slidr.services import drop_topics

    try:
        drop_topics(s, prefix)
        r = redis.Redis.from_url(s.redis_url, **s.redis_kwargs())
        keys = list(r.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            r.delete(*keys)
    except Exception:
        pass


# --- the fault tests' accounting, printed at the end of the run (issue 12: CI shows it) -------------------------
FAULT_ACCOUNTS: list[str] = []  # one JSON line per fault test (tests/stream/test_faults.py account())


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FAULT_ACCOUNTS:
        terminalreporter.section("fault accounting (clicks in = unique clicks decided + dead letters)")
        for line in FAULT_ACCOUNTS:
            terminalreporter.write_line(line)
