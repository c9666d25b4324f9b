"""The worker image, run for real (issue 19): a container with --network host against a local broker and
redis-server decides every click, and its HEALTHCHECK turns healthy, then unhealthy when the broker stops."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from schemas.events import decode_decision
from slidr.settings import Settings
from slidr.topics import Topics
from stream import toymodel
from stream.health import read_verdict
from tests.deploy.engine import WORKER_IMAGE, Engine, free_port
from tests.stream import kafka_helpers as K
from tests.stream.helpers import traffic

pytestmark = pytest.mark.integration

N_CLICKS = 3000
STUCK_S = 10


def _registry() -> Path:
    """A toy model registry the container's non-root user can read (pytest's tmp folders are root's, 0700)."""
    reg = Path(tempfile.mkdtemp(prefix="slidr-image-registry-"))
    reg.chmod(0o755)
    toymodel.build_registry(reg, version="toy-image")
    return reg


def _metrics(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return str(r.read().decode())
    except OSError:
        return ""


def test_worker_container_decides_every_click_and_reports_its_health(engine: Engine, own_broker: Settings) -> None:
    from slidr.services import create_topics

    prefix = f"t-image-{uuid.uuid4().hex[:8]}"
    s = own_broker.model_copy(update={"topic_prefix": prefix, "worker_id": f"{prefix}-group",
                                      "redis_key_prefix": prefix})
    t = Topics(prefix)
    create_topics(s)  # on the test's own broker, which goes with its folder
    reg = _registry()
    port = free_port()
    name = f"slidr-it-{uuid.uuid4().hex[:8]}"
    env = {"SLIDR_KAFKA_BOOTSTRAP": s.kafka_bootstrap, "SLIDR_REDIS_URL": s.redis_url, "SLIDR_TOPIC_PREFIX": prefix,
           "SLIDR_WORKER_ID": s.worker_id, "SLIDR_PARTITIONS": str(s.partitions), "SLIDR_REDIS_KEY_PREFIX": prefix,
           "SLIDR_METRICS_PORT": str(port), "SLIDR_METRICS_BIND": "127.0.0.1",  # host network: loopback only
           "SLIDR_HEALTH_STUCK_AFTER_S": str(STUCK_S)}
    args = [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
    # as deploy/k8s runs it: a read-only root file system, the state folder on a volume of its own
    engine.docker("run", "-d", "--name", name, "--network", "host", "--read-only", "-v", "/var/lib/slidr",
                  "-v", f"{reg}:/registry:ro", *args, WORKER_IMAGE, "worker", "--loglevel", "warning")
    try:
        assert engine.docker("inspect", "-f", "{{.Config.User}}", name).stdout.strip() == "10001"  # not root
        log = engine.wait_health(name, "healthy", timeout_s=240)
        assert log and log[-1]["ExitCode"] == 0 and "healthy" in log[-1]["Output"], log[-1:]

        clicks = traffic(N_CLICKS, seed=19)
        asyncio.run(K.produce(s, t.clicks, clicks))
        want = {c.click_id for c in clicks}

        def decided(recs: dict[str, list[Any]]) -> set[str]:
            return {decode_decision(m.value).click_id for m in recs[t.decisions]}

        got = asyncio.run(K.read_until(s, [t.decisions], lambda r: decided(r) >= want, timeout_s=240))
        assert decided(got) == want, (len(want - decided(got)), engine.docker("logs", name, check=False).stderr[-3000:])
        # idle now, with lag left on the table changelogs (written, never read after recovery): still healthy,
        # by a verdict made more than STUCK_S after the last decision
        done = time.time()
        t_end = time.monotonic() + 120
        verdict: tuple[float | None, float | None, dict[str, float]] = (None, None, {})
        while time.monotonic() < t_end:
            verdict = read_verdict(_metrics(port))
            if verdict[1] is not None and verdict[1] > done + STUCK_S + 1:
                break
            time.sleep(1)
        assert verdict[0] == 1.0 and verdict[1] is not None and verdict[1] > done + STUCK_S + 1, verdict
        assert engine.health(name)[0] == "healthy"

        from slidr import services as svc

        svc.run_script("kafka", "down", s)  # the broker goes away under a running worker
        log = engine.wait_health(name, "unhealthy", timeout_s=180)
        assert "broker" in log[-1]["Output"], log[-1:]
    finally:
        engine.docker("rm", "-f", "-v", name, check=False)
        shutil.rmtree(reg, ignore_errors=True)
