"""Prometheus for real (issue 19): Debian's prometheus, run on loopback, scrapes a running worker and the monitor;
`promtool check metrics` passes on their expositions; `promtool query instant` returns the decisions that the
billing consumer counts."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from stream import billing, toymodel
from tests.deploy.engine import ROOT, free_port, script, unavailable
from tests.stream import kafka_helpers as K
from tests.stream.helpers import traffic

pytestmark = pytest.mark.integration

PROMETHEUS, PROMTOOL = "/usr/bin/prometheus", "/usr/bin/promtool"
N_CLICKS = 2000
LOGS = ("w.log", "m.log", "prom.log")


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return str(r.read().decode())
    except OSError:
        return ""


def _promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=60)


def _instant(url: str, query: str) -> list[dict[str, Any]]:
    p = _promtool("query", "instant", "-o", "json", url, query)
    assert p.returncode == 0, p.stdout + p.stderr
    return list(json.loads(p.stdout))


def test_prometheus_scrapes_worker_and_monitor_and_counts_what_billing_counts(kenv: Any) -> None:
    if not Path(PROMETHEUS).exists():
        inst = script("deploy/docker/engine.sh", "install")
        if inst.returncode != 0:
            unavailable(f"Debian's prometheus could not be installed: {inst.stderr[-2000:]}")
    s = kenv.settings
    toymodel.build_registry(s.registry_path, version="toy-prom")
    wport, mport, pport = free_port(), free_port(), free_port()
    env = {**K.worker_env(s), "SLIDR_METRICS_PORT": str(wport)}
    procs = []
    with (kenv.workdir / "w.log").open("wb") as f:
        procs.append(subprocess.Popen([sys.executable, "-m", "slidr", "worker", "--data-dir",
                                       str(kenv.workdir / "w0"), "--loglevel", "warning"],
                                      env=env, stdout=f, stderr=subprocess.STDOUT))
    with (kenv.workdir / "m.log").open("wb") as f:  # the monitor serves its metrics on the setting + 1
        procs.append(subprocess.Popen([sys.executable, "-m", "slidr", "monitor"],
                                      env={**env, "SLIDR_METRICS_PORT": str(mport - 1)}, stdout=f,
                                      stderr=subprocess.STDOUT))
    cfg = kenv.workdir / "prometheus.yml"
    cfg.write_text("global: {scrape_interval: 1s}\nscrape_configs:\n"
                   f"  - job_name: slidr-worker\n    static_configs: [{{targets: ['127.0.0.1:{wport}']}}]\n"
                   f"  - job_name: slidr-monitor\n    static_configs: [{{targets: ['127.0.0.1:{mport}']}}]\n")
    assert _promtool("check", "config", str(cfg)).returncode == 0
    base = f"http://127.0.0.1:{pport}"
    with (kenv.workdir / "prom.log").open("wb") as f:
        procs.append(subprocess.Popen([PROMETHEUS, f"--config.file={cfg}", f"--web.listen-address=127.0.0.1:{pport}",
                                       f"--storage.tsdb.path={kenv.workdir / 'tsdb'}"], stdout=f,
                                      stderr=subprocess.STDOUT))
    try:
        clicks = traffic(N_CLICKS, seed=23)
        asyncio.run(K.produce(s, kenv.topics.clicks, clicks))
        t_end = time.monotonic() + 240
        text = ""
        while time.monotonic() < t_end:
            for proc in procs:
                assert proc.poll() is None, [(kenv.workdir / n).read_text()[-2000:] for n in LOGS]
            text = _get(f"http://127.0.0.1:{wport}/metrics")
            if f'slidr_clicks_total{{stage="ip"}} {N_CLICKS}.0' in text and "slidr_worker_healthy 1.0" in text:
                break
            time.sleep(0.5)
        monitor_text = _get(f"http://127.0.0.1:{mport}/metrics")
        assert "slidr_monitor_decisions_total" in monitor_text
        for expo in (text, monitor_text):
            check = _promtool("check", "metrics", stdin=expo)
            assert check.returncode == 0, check.stdout + check.stderr

        led = billing.read_all(s, idle_s=3.0)
        assert len(led.latest) == N_CLICKS
        by_kind = {"true": 0, "false": 0}
        for row in led.summary().values():
            by_kind["true"] += row["billable"]
            by_kind["false"] += row["invalidated"]

        # Prometheus has scraped both, and holds the worker's decision counts at their final values
        got: dict[str, float] = {}
        while time.monotonic() < t_end:
            up = {r["metric"]["job"]: r["value"][1] for r in _instant(base, "up")}
            res = _instant(base, 'sum by (valid) (slidr_decisions_total{job="slidr-worker"})')
            got = {r["metric"]["valid"].lower(): float(r["value"][1]) for r in res}
            if up == {"slidr-worker": "1", "slidr-monitor": "1"} and sum(got.values()) == N_CLICKS:
                break
            time.sleep(1)
        assert up == {"slidr-worker": "1", "slidr-monitor": "1"}, up
        assert led.records == N_CLICKS  # no click decided twice in this run, so records = clicks
        assert {k: got.get(k, 0.0) for k in by_kind} == {k: float(v) for k, v in by_kind.items()}, (got, by_kind)
        monitored = _instant(base, 'sum(slidr_monitor_decisions_total{job="slidr-monitor"})')
        assert monitored and float(monitored[0]["value"][1]) > 0, monitored
        # every query of the Grafana dashboard is valid PromQL, evaluated on this live data
        panels = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "slidr.json").read_text())["panels"]
        for expr in (t["expr"] for panel in panels for t in panel["targets"]):
            _instant(base, expr)
        assert _instant(base, 'sum(rate(slidr_clicks_total{stage="ip"}[1m]))')  # the throughput panel has data
    finally:
        for proc in reversed(procs):
            K.stop(proc)
