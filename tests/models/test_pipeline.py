"""End to end on the simulator's ``small`` scenario and the TalkingData sample: train, export, calibrate,
evaluate, report (the issue's done-when checks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("cvxpy")

from typer.testing import CliRunner

from models.config import TrainConfig
from models.labels import TEST, VAL
from models.metrics import ivr_at_fpr, rates, row_thresholds
from models.pipeline import load_training_data
from tests.conftest import TALKINGDATA_CSV, needs_shared

pytestmark = pytest.mark.train
TALKINGDATA = TALKINGDATA_CSV
# small and fast: the small scenario has ~85 purchasing clicks in validation, so a 1% budget is < 1 purchase
CFG = TrainConfig(epochs=12, hidden=(32, 16), progress=False, fpr_budget=0.05, min_slice_purchases=10)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.data.simulate import simulate_to

    out = tmp_path_factory.mktemp("small")
    simulate_to(out, "small", 1)
    return out


@pytest.fixture(scope="module")
def td(small: Path):  # type: ignore[no-untyped-def]
    return load_training_data(small, CFG)


def test_export_matches_torch(td, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from models.export import export_onnx, score_onnx
    from models.nets import predict
    from models.train import train

    rows = td.x[:5000]
    for kind in ("mlp", "logreg", "heuristic"):
        model, _ = train(td, CFG.replace(epochs=1), kind)
        path = export_onnx(model, td.x.shape[1], tmp_path / f"{kind}.onnx")
        got = score_onnx(path, rows)
        assert got.shape == (len(rows),) and got.dtype == np.float32
        assert float(np.abs(got - predict(model, rows)).max()) < 1e-5


def test_models_rank_mlp_logreg_heuristic_on_later_data(td) -> None:  # type: ignore[no-untyped-def]
    """At the same FPR on the held-out last quarter: IVR(MLP) > IVR(logreg) > IVR(heuristic) (3-seed mean)."""
    from models.nets import predict
    from models.train import train

    te = td.rows(TEST)
    ivr: dict[str, float] = {}
    for kind in ("mlp", "logreg", "heuristic"):
        seeds = (1,) if kind == "heuristic" else (1, 2, 3)
        vals = []
        for seed in seeds:
            model, _ = train(td, CFG.replace(seed=seed), kind)
            vals.append(ivr_at_fpr(predict(model, td.x[te]), td.purchased[te], CFG.fpr_budget))
        ivr[kind] = float(np.mean(vals))
    assert ivr["mlp"] > ivr["logreg"] > ivr["heuristic"], ivr


def test_cli_train_calibrate_evaluate_report(small: Path, td, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from models.export import score_onnx
    from models.pipeline import read_json
    from slidr.cli import app

    runner = CliRunner()
    model = tmp_path / "mlp"
    sets = ["--set", "epochs=12", "--set", "hidden=[32,16]", "--set", "progress=false",
            "--set", "min_slice_purchases=10"]
    r = runner.invoke(app, ["train", str(small), "--out", str(model), *sets])
    assert r.exit_code == 0, r.output
    manifest = read_json(model / "manifest.json")
    assert manifest["kind"] == "mlp" and set(manifest["sha256"]) == {"model.onnx", "calibration.json"}
    # ~85 purchasing clicks in validation: the 50% coverage floors alone need an FPR of about 0.06 here
    r = runner.invoke(app, ["calibrate", str(model), str(small), "--fpr-budget", "0.1"])
    assert r.exit_code == 0, r.output
    cal = read_json(model / "calibration.json")
    assert cal["method"] == "slice"

    # slice-level beats global at the same budget on the calibration data; every slice meets its floor
    va = td.rows(VAL)
    s = score_onnx(model / "model.onnx", td.x[va])
    thr = row_thresholds(td.slices[va], cal["thresholds"], cal["default_threshold"])
    sl = rates(s >= thr, td.purchased[va], td.heavy[va])
    gl = cal["validation"]["global_at_budget"]
    assert sl["fpr"] <= 0.1 and gl["fpr"] <= 0.1
    assert sl["ivr"] > gl["ivr"], (sl, gl)
    for name, v in cal["validation"]["slices"].items():
        if v["n_robotic"] >= CFG.min_slice_robotic:
            assert v["coverage"] >= CFG.coverage_floor, name

    r = runner.invoke(app, ["evaluate", str(model), str(small), "--json"])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.output)
    assert {"ivr", "fpr", "coverage", "auc", "bot_recall", "human_false_invalidation"} <= set(ev["overall"])
    assert len(ev["slices"]) == 6 and "archetype_recall" in ev["at_1pct_human_false_invalidation"]

    r = runner.invoke(app, ["report", str(model), str(small), "--out", str(tmp_path / "rep"), "--no-ablation"])
    assert r.exit_code == 0, r.output
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "## Baselines" in text and "(curves.png)" in text and (tmp_path / "rep" / "curves.png").stat().st_size


@needs_shared(TALKINGDATA_CSV)
def test_talkingdata_trains_calibrates_reports(tmp_path: Path) -> None:
    from models.data.talkingdata import import_talkingdata
    from models.pipeline import build_model

    data = tmp_path / "td"
    import_talkingdata(TALKINGDATA, data)
    summary = build_model(data, tmp_path / "model", "mlp", cfg=CFG, report_dir=tmp_path / "rep")
    assert summary["evaluation"]["overall"]["n"] > 0
    assert (tmp_path / "rep" / "report.md").exists()
