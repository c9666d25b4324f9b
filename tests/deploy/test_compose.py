"""The compose stack (issue 19): the file validates (docker-compose and the compose specification's JSON schema),
and the stack, less Grafana (its image comes from a registry), comes up here for real and decides clicks."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from schemas.events import decode_decision
from slidr.settings import Settings
from slidr.topics import Topics
from stream import toymodel
from tests.deploy.engine import ROOT, Engine, free_port, script, unavailable
from tests.stream import kafka_helpers as K
from tests.stream.helpers import traffic

COMPOSE = ROOT / "deploy" / "compose" / "compose.yaml"
COMPOSE_BIN = "/usr/bin/docker-compose"  # Debian's docker-compose (1.29)


@pytest.fixture(scope="module")
def compose_tools() -> None:
    if not Path(COMPOSE_BIN).exists():
        p = script("deploy/docker/engine.sh", "install")
        if p.returncode != 0:
            unavailable(f"docker-compose could not be installed: {p.stderr[-2000:]}")


def _model_dir() -> Path:
    """A toy model folder the containers' non-root user can read."""
    d = Path(tempfile.mkdtemp(prefix="slidr-compose-model-"))
    d.chmod(0o755)
    toymodel.build(d / "m", version="toy-compose")
    return d / "m"


def test_compose_file_validates(compose_tools: None, tmp_path: Path) -> None:
    env = {**os.environ, "SLIDR_MODEL_DIR": str(tmp_path)}
    p = subprocess.run([COMPOSE_BIN, "-f", str(COMPOSE), "config", "-q"], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                        str(COMPOSE)], capture_output=True, text=True)
    assert p.returncode == 0 and "ok -- validation done" in p.stdout, p.stdout + p.stderr
    # the file names no setup job without a model folder: compose refuses it with the reason
    env.pop("SLIDR_MODEL_DIR")
    p = subprocess.run([COMPOSE_BIN, "-f", str(COMPOSE), "config", "-q"], env=env, capture_output=True, text=True)
    assert p.returncode != 0 and "set SLIDR_MODEL_DIR" in p.stderr, p.stderr


@pytest.fixture
def stack(engine: Engine, compose_tools: None, services: Settings, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The stack up (less Grafana) on free ports, with its own project name; down, volumes and all, at the end."""
    p = script("deploy/docker/build.sh", "services", env={"SLIDR_DOCKER_KEEP": "1"})
    if p.returncode != 0:
        unavailable(f"deploy/docker/build.sh services failed: {p.stderr[-3000:]}")
    ports = {k: free_port() for k in ("SLIDR_KAFKA_PORT", "SLIDR_KAFKA_CONTROLLER_PORT", "SLIDR_REDIS_PORT",
                                      "SLIDR_WORKER1_METRICS_PORT", "SLIDR_WORKER2_METRICS_PORT",
                                      "SLIDR_PROMETHEUS_PORT")}
    monitor = free_port()
    while monitor + 1 in ports.values():
        monitor = free_port()
    ports["SLIDR_MONITOR_PORT_SETTING"] = monitor
    prom = tmp_path / "prometheus.yml"
    w1, w2 = ports["SLIDR_WORKER1_METRICS_PORT"], ports["SLIDR_WORKER2_METRICS_PORT"]
    prom.write_text(
        "global: {scrape_interval: 2s}\nscrape_configs:\n"
        f"  - job_name: slidr-worker\n    static_configs: [{{targets: ['127.0.0.1:{w1}', '127.0.0.1:{w2}']}}]\n"
        f"  - job_name: slidr-monitor\n    static_configs: [{{targets: ['127.0.0.1:{monitor + 1}']}}]\n")
    prom.chmod(0o644)
    tmp_path.chmod(0o755)
    model = _model_dir()
    project = f"slidr-it-{uuid.uuid4().hex[:6]}"
    env = {**engine.env, **{k: str(v) for k, v in ports.items()}, "SLIDR_MODEL_DIR": str(model),
           "SLIDR_PROMETHEUS_CONFIG": str(prom), "SLIDR_TOPIC_PREFIX": project, "SLIDR_WORKER_ID": f"{project}-g"}

    def compose(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([COMPOSE_BIN, "-p", project, "-f", str(COMPOSE), *args], env=env, capture_output=True,
                              text=True, timeout=timeout)

    up = compose("up", "-d")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield {"compose": compose, "ports": ports, "project": project, "env": env}
    finally:
        logs = compose("logs", "--no-color", "--tail", "30")
        down = compose("down", "-v", "--remove-orphans")
        shutil.rmtree(model.parent, ignore_errors=True)
        if down.returncode != 0:
            print(down.stderr, logs.stdout[-5000:], file=sys.stderr)


@pytest.mark.integration
def test_compose_stack_less_grafana_comes_up_and_decides_clicks(engine: Engine, stack: dict[str, Any],
                                                                services: Settings) -> None:
    project, ports = stack["project"], stack["ports"]
    for svc in ("worker-1", "worker-2"):
        engine.wait_health(f"{project}_{svc}_1", "healthy", timeout_s=300)
    ps = stack["compose"]("ps", "--services", "--filter", "status=running").stdout.split()
    assert sorted(ps) == ["kafka", "monitor", "prometheus", "redis", "worker-1", "worker-2"], ps  # setup has exited
    setup = engine.docker("inspect", "-f", "{{.State.ExitCode}}", f"{project}_setup_1").stdout.strip()
    assert setup == "0"

    s = services.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{ports['SLIDR_KAFKA_PORT']}",
                                    "topic_prefix": project})
    t = Topics(project)
    clicks = traffic(500, seed=7)
    asyncio.run(K.produce(s, t.clicks, clicks))
    want = {c.click_id for c in clicks}

    def decided(recs: dict[str, list[Any]]) -> set[str]:
        return {decode_decision(m.value).click_id for m in recs[t.decisions]}

    got = asyncio.run(K.read_until(s, [t.decisions], lambda r: decided(r) >= want, timeout_s=240))
    assert decided(got) == want, stack["compose"]("logs", "--no-color", "--tail", "40").stdout[-4000:]

    # Prometheus (in the stack) scrapes both workers and the monitor
    url = f"http://127.0.0.1:{ports['SLIDR_PROMETHEUS_PORT']}/api/v1/query?query=up"
    t_end, up = time.monotonic() + 120, {}
    while time.monotonic() < t_end:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                res = orjson.loads(r.read())["data"]["result"]
            up = {x["metric"]["instance"]: x["value"][1] for x in res}
        except OSError:
            up = {}
        if len(up) == 3 and all(v == "1" for v in up.values()):
            break
        time.sleep(1)
    assert len(up) == 3 and all(v == "1" for v in up.values()), up
