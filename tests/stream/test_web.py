"""The worker's web server (issue 16, item 6): loopback by default, health and stats only, no table views."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from stream import toymodel
from tests.stream import kafka_helpers as K

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        return int(so.getsockname()[1])


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def _listening(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on ``port`` (from /proc/net/tcp: state 0A)."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, st = line.split()[1], line.split()[3]
        addr, p = local.split(":")
        if st == "0A" and int(p, 16) == port:
            out.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
    return out


def test_web_server_binds_loopback_and_serves_no_table(kenv: Any) -> None:
    s = kenv.settings
    toymodel.build_registry(s.registry_path, version="toy-it")
    port = _free_port()
    env = {**K.worker_env(s), "SLIDR_WORKER_WEB_PORT": str(port)}
    env.pop("SLIDR_WORKER_WEB_BIND", None)  # the default
    log = kenv.workdir / "w.log"
    with log.open("wb") as f:
        w = subprocess.Popen([sys.executable, "-m", "slidr", "worker", "--data-dir", str(kenv.workdir / "w0"),
                              "--loglevel", "warning"], env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        t_end = time.monotonic() + 120
        while time.monotonic() < t_end and not _listening(port):
            assert w.poll() is None, log.read_text()[-2000:]
            time.sleep(0.5)
        assert _listening(port) == {"127.0.0.1"}  # never 0.0.0.0
        base = f"http://127.0.0.1:{port}"
        while time.monotonic() < t_end and _get(base + "/") != 200:  # up once the tables have recovered
            time.sleep(0.5)
        assert _get(base + "/") == 200
        assert _get(base + "/table/") == 404  # Faust's table list (200 with its table views on)
        assert _get(base + "/table/ips/198.51.100.7/") == 404
        assert _get(base + "/table/users/c:cust1/") == 404
        assert _get(base + "/router/users/c:cust1/") == 404
    finally:
        K.stop(w)
