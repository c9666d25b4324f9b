"""The Grafana dashboard (issue 19): it type-checks against Grafana's published types (@grafana/schema, tsc
--strict: deploy/grafana/typecheck.sh), and every metric its queries name is one the code exports. (Prometheus
evaluates each of its queries against a live worker and monitor in test_prometheus.py.)"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from prometheus_client.metrics import MetricWrapperBase

from stream import metrics
from tests.deploy.engine import ROOT, script, unavailable

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "slidr.json"


def _typecheck(folder: Path | None = None) -> Any:
    if shutil.which("npm") is None:
        unavailable("npm (Node.js) is not installed")
    return script("deploy/grafana/typecheck.sh", env={"SLIDR_DASHBOARDS_DIR": str(folder)} if folder else None,
                  timeout=600)


def _exprs() -> list[str]:
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p.get("targets", [])]


def _exported() -> set[str]:
    """Sample names of every metric in stream/metrics.py (a counter's _total, a histogram's _bucket/_sum/_count)."""
    names: set[str] = set()
    for m in vars(metrics).values():
        if isinstance(m, MetricWrapperBase):
            kind, name = str(m._type), str(m._name)
            names |= {"counter": {f"{name}_total"}, "histogram": {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
                      }.get(kind, {name})
    return names


def test_dashboard_type_checks_against_grafana_schema() -> None:
    p = _typecheck()
    if p.returncode != 0 and "npm install" in p.stderr and "ERR" in p.stderr:
        unavailable(f"the npm packages could not be installed: {p.stderr[-2000:]}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 dashboard(s) type-check against @grafana/schema 11.2.0" in p.stderr


def test_typecheck_refuses_a_misspelt_field(tmp_path: Path) -> None:
    d = json.loads(DASHBOARD.read_text())
    d["panels"][0]["gridPos"]["width"] = 12  # gridPos has w, not width
    (tmp_path / "bad.json").write_text(json.dumps(d))
    p = _typecheck(tmp_path)
    assert p.returncode != 0 and "width" in p.stdout + p.stderr, p.stdout + p.stderr


def test_every_metric_the_dashboard_names_is_exported() -> None:
    named = {n for e in _exprs() for n in re.findall(r"\bslidr_[a-z0-9_]+", e)}
    assert len(named) >= 15, named
    missing = named - _exported()
    assert not missing, missing
    # the panels: throughput, lag, latency, IVR/FPR per slice, model version, rollbacks, degraded
    for want in ("slidr_clicks_total", "slidr_consumer_lag", "slidr_batch_seconds_bucket", "slidr_live_ivr",
                 "slidr_live_fpr", "slidr_active_model", "slidr_automatic_rollbacks_total",
                 "slidr_degraded_decisions_total"):
        assert want in named, want
