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
    (d / "calibration.json").write_bytes(b"{}")
    manifest = {"model_version": version, "sha256": {"model.onnx": registry.sha256_file(d / "model.onnx"),
                                                    "calibration.json": registry.sha256_file(d / "calibration.json")}}
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


def test_versions_are_plain_names(tmp_path: Path) -> None:
    """(issue 16, item 9) ACTIVE's content and a manifest's model_version become path parts: never a path."""
    from stream.scoring import ModelError, active_model_dir

    st = Settings(registry_path=tmp_path / "reg")
    with pytest.raises(registry.RegistryError, match="plain version name"):
        registry.publish(_model(tmp_path / "m", "../escaped"), st)
    assert not (tmp_path / "escaped").exists()
    registry.publish(_model(tmp_path / "m1", "v1"), st)
    (tmp_path / "reg" / "ACTIVE").write_text("../../etc")
    with pytest.raises(registry.RegistryError, match="plain version name"):
        registry.active_model_dir(st)
    with pytest.raises(ModelError, match="plain version name"):
        active_model_dir(tmp_path / "reg")
    for bad in ("/abs", "a/b", "..", "v1/..", "", "x" * 200):
        with pytest.raises(registry.RegistryError):
            registry.check_version(bad)


def test_a_recalibrated_model_under_the_same_version_is_refused(tmp_path: Path) -> None:
    st = Settings(registry_path=tmp_path / "reg")
    d = _model(tmp_path / "m", "v1")
    registry.publish(d, st)
    m = orjson.loads((d / "manifest.json").read_bytes())
    (d / "calibration.json").write_bytes(b'{"default_threshold": 0.4}')  # recalibrated in place, same version
    m["sha256"]["calibration.json"] = registry.sha256_file(d / "calibration.json")
    (d / "manifest.json").write_bytes(orjson.dumps(m))
    with pytest.raises(registry.RegistryError, match="already in the registry with other files"):
        registry.publish(d, st)  # (on the landed main: silently kept the old thresholds)


def test_load_model_verifies_every_file(tmp_path: Path) -> None:
    from stream import toymodel
    from stream.scoring import ModelError, load_model

    d = toymodel.build(tmp_path / "toy", version="toy-9")
    load_model(d)
    (d / "calibration.json").write_bytes(b'{"default_threshold": 0.0}')  # every click invalid
    with pytest.raises(ModelError, match=r"calibration\.json does not match"):
        load_model(d)
    m = orjson.loads((d / "manifest.json").read_bytes())
    del m["sha256"]["calibration.json"]
    (d / "manifest.json").write_bytes(orjson.dumps(m))
    with pytest.raises(ModelError, match=r"no sha256 for calibration\.json"):
        load_model(d)


def test_the_feature_hash_moves_when_a_feature_function_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """(issue 16, item 9) The hash covers the computation, not only the spec's constants."""
    from stream import features as F

    assert F.compute_spec_hash() == F.FEATURE_SPEC_HASH
    orig = F._window_counts
    monkeypatch.setattr(F, "_window_counts", lambda b, x, w: [c + 1 for c in orig(b, x, w)])
    assert F.compute_spec_hash() != F.FEATURE_SPEC_HASH
    monkeypatch.setattr(F, "_window_counts", orig)
    monkeypatch.setattr(F, "GAP_EWMA_ALPHA", 0.3)  # a constant changed without the spec dict
    assert F.compute_spec_hash() != F.FEATURE_SPEC_HASH
