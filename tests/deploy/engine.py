"""Support of the deployment tests: the local container engine (deploy/docker/engine.sh, build.sh) and tools.

A tool that cannot be had here (not root, no package, a registry down) skips the tests that need it, with the
reason, on a developer's machine; in CI (``CI=true``) it fails them: CI must install every tool it tests with.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = "/usr/bin/docker"  # Debian's client (engine.sh): a newer one earlier on PATH may lack buildx
WORKER_IMAGE = os.environ.get("SLIDR_WORKER_IMAGE", "slidr-worker:dev")


def unavailable(why: str) -> NoReturn:
    """Fail in CI, skip elsewhere."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must have this: {why}", pytrace=False)
    pytest.skip(why)


def free_port() -> int:
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        return int(so.getsockname()[1])


def script(*args: str, env: dict[str, str] | None = None, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", *args], cwd=ROOT, env={**os.environ, **(env or {})}, text=True,
                          capture_output=True, timeout=timeout)


class Engine:
    """The started engine: ``docker(...)`` runs Debian's client against it."""

    def __init__(self) -> None:
        out = script("deploy/docker/engine.sh", "env").stdout.strip()
        self.host = out.split("=", 1)[1]
        self.env = {**os.environ, "DOCKER_HOST": self.host}

    def docker(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([DOCKER, *args], env=self.env, text=True, capture_output=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)}: exit {p.returncode}\n{p.stdout[-2000:]}\n"
                                 f"{p.stderr[-2000:]}")
        return p

    def health(self, container: str) -> tuple[str, list[dict[str, Any]]]:
        """(status, last probe results) of a container's HEALTHCHECK ('starting', 'healthy', 'unhealthy')."""
        out = self.docker("inspect", "-f", "{{json .State}}", container).stdout
        state = json.loads(out)
        h = state.get("Health") or {}
        return str(h.get("Status", "none")), list(h.get("Log") or [])

    def wait_health(self, container: str, want: str, timeout_s: float) -> list[dict[str, Any]]:
        t_end = time.monotonic() + timeout_s
        status, log = "none", list[dict[str, Any]]()
        while time.monotonic() < t_end:
            status, log = self.health(container)
            if status == want:
                return log
            time.sleep(1)
        raise AssertionError(f"{container} is {status}, not {want}, after {timeout_s:.0f} s; probes: {log[-3:]}\n"
                             + self.docker("logs", "--tail", "40", container, check=False).stderr[-3000:])


def start_engine_and_build(targets: str = "all") -> tuple[Engine, bool]:
    """Start the engine (installing it when missing) and build the images (cached); (engine, started here)."""
    if os.geteuid() != 0 and not Path("/usr/sbin/dockerd").exists():
        unavailable("the container engine is not installed and installing it needs root")
    was_up = script("deploy/docker/engine.sh", "status").returncode == 0
    p = script("deploy/docker/build.sh", targets, env={"SLIDR_DOCKER_KEEP": "1"})
    if p.returncode != 0:
        if not was_up:
            script("deploy/docker/engine.sh", "stop")
        unavailable(f"deploy/docker/build.sh {targets} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return Engine(), not was_up
