"""Registry: publish, ACTIVE/STABLE pointers, rollback, integrity check."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from models import registry
from slidr.settings import Settings


def _model(d: Path, version: str) -> Path:
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(version.encode())
    manifest = {"model_version": version, "sha256": {"model.onnx": registry.sha256_file(d / "model.onnx")}}
    (d / "manifest.json").write_bytes(orjson.dumps(manifest))
    return d


def test_publish_activate_rollback(tmp_path: Path) -> None:
    st = Settings(registry_path=tmp_path / "reg")
    with pytest.raises(registry.RegistryError):
        registry.active_model_dir(st)
    assert registry.publish(_model(tmp_path / "m1", "v1"), st) == "v1"
    assert registry.stable_version(st) == "v1"  # the first published is the stable one
    registry.publish(_model(tmp_path / "m2", "v2"), st)
    assert registry.active_model_dir(st) == tmp_path / "reg" / "v2"
    assert registry.stable_version(st) == "v1" and registry.versions(st) == ["v1", "v2"]
    assert registry.rollback(st) == "v1" and registry.active_version(st) == "v1"
    registry.mark_stable("v2", st)
    assert registry.rollback(st) == "v2"


def test_tampered_model_is_refused(tmp_path: Path) -> None:
    d = _model(tmp_path / "m", "v1")
    (d / "model.onnx").write_bytes(b"other")
    with pytest.raises(registry.RegistryError, match="sha256"):
        registry.publish(d, Settings(registry_path=tmp_path / "reg"))
