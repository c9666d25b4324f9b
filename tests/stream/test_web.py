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


def test_metrics_endpoint_answers_with_the_worker_metrics_during_a_run(kenv: Any) -> None:
    """(issue 9) Prometheus /metrics of a worker deciding clicks, scraped while it runs."""
    import asyncio

    from tests.stream.helpers import traffic

    s = kenv.settings
    toymodel.build_registry(s.registry_path, version="toy-it")
    port = _free_port()
    env = {**K.worker_env(s), "SLIDR_METRICS_PORT": str(port)}
    log = kenv.workdir / "w.log"
    with log.open("wb") as f:
        w = subprocess.Popen([sys.executable, "-m", "slidr", "worker", "--data-dir", str(kenv.workdir / "w0"),
                              "--loglevel", "warning"], env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        clicks = traffic(3000, seed=3)
        asyncio.run(K.produce(s, kenv.topics.clicks, clicks, [b"junk"]))
        t_end = time.monotonic() + 120
        text = ""
        while time.monotonic() < t_end:
            assert w.poll() is None, log.read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    text = r.read().decode()
            except OSError:
                text = ""
            if 'slidr_clicks_total{stage="ip"} 3000.0' in text and "slidr_consumer_lag{" in text:
                break
            time.sleep(0.5)
    finally:
        K.stop(w)
    assert _listening(port) == set()  # (the worker is gone)
    for name in ('slidr_clicks_total{stage="user"} 3001.0', 'slidr_clicks_total{stage="ip"} 3000.0',
                 'slidr_dead_letters_total{stage="user"} 1.0', "slidr_decisions_total{", "slidr_consumer_lag{",
                 "slidr_batch_events_bucket{", "slidr_scoring_seconds_bucket{", "slidr_table_keys{",
                 'slidr_active_model{model_version="toy-it"} 1.0', "slidr_profile_cache_up 1.0"):
        assert name in text, (name, text[:3000])
    decided = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith("slidr_decisions_total{"))
    assert decided == 3000.0
    # RocksDB's accounting of the tables' stores: both tables have written states into their memtables
    rocks = {line.split(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line.startswith("slidr_table_rocksdb_bytes{")}
    for table in ("users", "ips"):
        assert rocks[f'slidr_table_rocksdb_bytes{{kind="memtables",table="{table}"}}'] > 0, rocks
        assert f'slidr_table_rocksdb_bytes{{kind="sst_files",table="{table}"}}' in rocks, rocks
