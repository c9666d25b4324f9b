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


def _toy(reg: Path, version: str, **kw: object) -> Path:
    from stream import toymodel

    return toymodel.build(reg.parent / "build" / version, version=version, **kw)  # type: ignore[arg-type]


def test_states_and_history(tmp_path: Path) -> None:
    st = Settings(registry_path=tmp_path / "reg")
    registry.publish(_toy(st.registry_path, "v1"), st)
    registry.register(_toy(st.registry_path, "v2"), st, reason="retrain")
    registry.register(_toy(st.registry_path, "v3"), st)
    assert registry.states(st) == {"v1": ["active", "stable"], "v2": ["candidate"], "v3": ["candidate"]}
    assert registry.promote("v2", st, reason="looks good") == "v2"
    assert registry.states(st) == {"v1": ["stable"], "v2": ["active"], "v3": ["candidate"]}
    assert registry.rollback(st, reason="live FPR") == "v1"
    assert registry.states(st) == {"v1": ["active", "stable"], "v2": ["retired"], "v3": ["candidate"]}
    h = registry.history(st)
    assert [(e["action"], e["from"], e["to"], e["reason"]) for e in h] == [
        ("register", None, "v1", ""), ("promote", None, "v1", "published"), ("mark_stable", None, "v1", "published"),
        ("register", None, "v2", "retrain"), ("register", None, "v3", ""), ("promote", "v1", "v2", "looks good"),
        ("rollback", "v2", "v1", "live FPR")]
    assert all(e["time"].endswith("+00:00") and e["ts_ms"] > 0 and e["by"] for e in h)
    d = registry.describe("v2", st)
    assert d["states"] == ["retired"] and [e["action"] for e in d["history"]] == ["register", "promote", "rollback"]


def test_promote_refuses_a_tampered_truncated_or_mismatched_model(tmp_path: Path) -> None:
    st = Settings(registry_path=tmp_path / "reg")
    registry.publish(_toy(st.registry_path, "good"), st)
    reg = st.registry_path

    def refused(version: str, match: str) -> None:
        with pytest.raises(registry.RegistryError, match=match):
            registry.promote(version, st)
        assert registry.active_version(st) == "good"  # the current model stays active
        assert registry.history(st)[-1]["action"] == "refuse" and registry.history(st)[-1]["to"] == version

    registry.register(_toy(reg, "tampered"), st)
    raw = bytearray((reg / "tampered" / "model.onnx").read_bytes())
    raw[-5] ^= 1
    (reg / "tampered" / "model.onnx").write_bytes(bytes(raw))
    refused("tampered", r"tampered: model\.onnx does not match")

    registry.register(_toy(reg, "truncated"), st)  # truncated, its digest rewritten to match: the graph is refused
    f = reg / "truncated" / "model.onnx"
    f.write_bytes(f.read_bytes()[:200])
    m = orjson.loads((reg / "truncated" / "manifest.json").read_bytes())
    m["sha256"]["model.onnx"] = registry.sha256_file(f)
    (reg / "truncated" / "manifest.json").write_bytes(orjson.dumps(m))
    refused("truncated", r"model\.onnx does not load")

    registry.register(_toy(reg, "otherspec", feature_spec_hash="0" * 64), st)
    refused("otherspec", "feature spec")

    registry.register(_toy(reg, "recal"), st)  # thresholds edited in place after registering
    (reg / "recal" / "calibration.json").write_bytes(b'{"default_threshold": 0.0}')
    refused("recal", r"calibration\.json does not match")

    d = _toy(reg, "pickled")
    (d / "weights.pkl").write_bytes(b"\x80\x04K\x01.")
    m = orjson.loads((d / "manifest.json").read_bytes())
    m["sha256"]["weights.pkl"] = registry.sha256_file(d / "weights.pkl")
    (d / "manifest.json").write_bytes(orjson.dumps(m))
    with pytest.raises(registry.RegistryError, match=r"weights\.pkl.*only \.onnx and \.json"):
        registry.register(d, st)
    assert registry.promote("good", st) == "good"  # the intact one still promotes
    with pytest.raises(registry.RegistryError, match="not in the registry"):
        registry.promote("absent", st)


def test_history_appends_from_two_processes_never_interleave(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from models import registry; from slidr.settings import Settings; "
            "s = Settings(registry_path=Path(sys.argv[1])); "
            "[registry.record(s, 'note', None, 'v', sys.argv[2] * 3000) for _ in range(300)]")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "reg"), tag]) for tag in "ab"]
    assert [p.wait(120) for p in procs] == [0, 0]
    lines = (tmp_path / "reg" / registry.HISTORY).read_bytes().splitlines()
    assert len(lines) == 600
    reasons = [orjson.loads(line)["reason"] for line in lines]  # every line whole: a torn one would not parse
    assert sorted(set(reasons)) == ["a" * 3000, "b" * 3000]


def test_models_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from slidr.cli import app
    from slidr.settings import get_settings

    st = Settings(registry_path=tmp_path / "reg")
    registry.publish(_toy(st.registry_path, "v1"), st)
    registry.register(_toy(st.registry_path, "v2"), st)
    monkeypatch.setenv("SLIDR_REGISTRY_PATH", str(st.registry_path))
    get_settings.cache_clear()
    try:
        run = CliRunner().invoke
        r = run(app, ["models", "list", "--json"])
        assert r.exit_code == 0, r.output
        listed = orjson.loads(r.stdout)
        assert listed["active"] == "v1" and listed["versions"] == {"v1": ["active", "stable"], "v2": ["candidate"]}
        assert [e["action"] for e in listed["history"]] == ["register", "promote", "mark_stable", "register"]
        r = run(app, ["models", "promote", "v2", "--reason", "by hand"])
        assert r.exit_code == 0 and "active: v1 -> v2" in r.stdout, r.output
        assert "promote     v1 -> v2  (by hand)" in run(app, ["models", "list"]).stdout
        assert orjson.loads(run(app, ["models", "show", "v2", "--json"]).stdout)["states"] == ["active"]
        assert run(app, ["models", "verify"]).exit_code == 0
        (st.registry_path / "v1" / "calibration.json").write_bytes(b"{}")
        r = run(app, ["models", "verify", "--json"])
        assert r.exit_code == 1
        assert "v1: calibration.json does not match" in orjson.loads(r.stdout)["versions"]["v1"]["error"]
        r = run(app, ["models", "rollback", "--reason", "test"])  # stable v1 is broken: refused, v2 stays
        assert r.exit_code == 1 and registry.active_version(st) == "v2", r.output
    finally:
        get_settings.cache_clear()
