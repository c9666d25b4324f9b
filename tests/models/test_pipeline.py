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
from models.labels import TEST, TRAIN, VAL
from models.metrics import ivr_at_fpr, rates, roc_auc, row_thresholds
from models.pipeline import REFERENCE_MIN_ROWS, load_training_data
from tests.conftest import TALKINGDATA_CSV, needs_shared

pytestmark = pytest.mark.train
TALKINGDATA = TALKINGDATA_CSV
# small and fast: the small scenario has ~85 purchasing clicks in validation, so a 1% budget is < 1 purchase
# attribution_window_h 0: the small scenario is one day with a 2 h label outage at 15:00, so the default 7 h window
# would leave only 00:00-08:00 labelled; these tests are about the pipeline (label maturity: tests/models/test_labels)
CFG = TrainConfig(epochs=12, hidden=(32, 16), progress=False, fpr_budget=0.05, min_slice_purchases=10,
                  attribution_window_h=0.0)


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
    for kind in ("mlp", "dcn", "logreg", "heuristic"):
        model, _ = train(td, CFG.replace(epochs=1), kind)
        path = export_onnx(model, td.x.shape[1], tmp_path / f"{kind}.onnx")
        got = score_onnx(path, rows)
        assert got.shape == (len(rows),) and got.dtype == np.float32
        assert float(np.abs(got - predict(model, rows)).max()) < 1e-5


def test_ensemble_averages_members_trained_from_consecutive_seeds(td) -> None:  # type: ignore[no-untyped-def]
    import torch

    from models.train import train

    cfg = CFG.replace(epochs=2, ensemble=3)
    ens, hist = train(td, cfg, "mlp")
    single, _ = train(td, cfg.replace(ensemble=1), "mlp")
    x = torch.from_numpy(td.x[:3000])
    with torch.no_grad():
        members = [m.logits(x) for m in ens.members]
        assert torch.allclose(members[0], single.logits(x), atol=1e-6)  # member 0 = the single model of cfg.seed
        assert not torch.allclose(members[0], members[1], atol=1e-3)  # other seeds, other networks
        assert torch.allclose(ens.logits(x), torch.stack(members).mean(dim=0), atol=1e-6)
    assert ens.kind == "mlp" and len(hist["members"]) == 3 and 0.0 < hist["best_val_loss"] < 1.0
    assert len(hist["epochs"]) == sum(m["epochs"] for m in hist["members"])


def test_an_ensemble_s_folder_holds_its_member_0_as_the_explainer(td, small: Path,  # type: ignore[no-untyped-def]
                                                                   tmp_path: Path) -> None:
    """explain.onnx (the reason codes' occlusion network, stream.scoring) is the ensemble's member 0: the network
    of cfg.seed trained alone; a single network's folder has none."""
    from models.export import score_onnx
    from models.nets import predict
    from models.pipeline import train_to_dir
    from models.train import train

    cfg = CFG.replace(epochs=1, ensemble=2)
    manifest = train_to_dir(small, tmp_path / "ens", "mlp", cfg, td=td)
    assert manifest["explainer"] == {"file": "explain.onnx", "of": "member 0 of 2"}
    first, _ = train(td, cfg.replace(ensemble=1), "mlp")
    rows = td.x[:3000]
    got = score_onnx(tmp_path / "ens" / "explain.onnx", rows)
    assert float(np.abs(got - predict(first, rows)).max()) < 1e-5
    assert float(np.abs(got - score_onnx(tmp_path / "ens" / "model.onnx", rows)).max()) > 1e-3  # not the ensemble
    manifest = train_to_dir(small, tmp_path / "ens", "mlp", cfg.replace(ensemble=1), td=td)  # the same folder
    assert manifest["explainer"] is None and "explain.onnx" not in manifest["sha256"]
    assert not (tmp_path / "ens" / "explain.onnx").exists()


@pytest.fixture(scope="module")
def default_td(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The default scenario (seed 7, the demo's) scaled to 100,000 clicks: its days, archetypes and held-out test
    day, small enough to train in seconds."""
    from models.data.simulate import simulate_to

    out = tmp_path_factory.mktemp("default100k")
    simulate_to(out, "default", 7, clicks=100_000)
    return load_training_data(out, TrainConfig(progress=False))


def test_models_rank_mlp_logreg_heuristic_on_later_data(default_td) -> None:  # type: ignore[no-untyped-def]
    """On the held-out test day, at the 1% FPR budget: IVR(MLP) > IVR(logreg) > IVR(heuristic) (3-seed mean) for one
    network; the served ensemble of networks (TrainConfig.ensemble) above logreg in truth bot recall at 1% human
    false-invalidation, and above the same ensemble trained without sample weights (models.weights).

    On the scaled default scenario (measured stop 36, training seeds 1-3): IVR 0.139 / 0.086 / 0.052; bot recall
    0.811 (ensemble) vs 0.485 (logreg), 0.656 unweighted. Seed 11's scenario: IVR 0.131 / 0.120 / 0.023, recall
    0.811 vs 0.737, 0.746 unweighted. (The one-day small scenario, used before, has ~85 purchasing clicks in
    validation and no later day: with the label weights logreg tied the ensemble there, 0.384 vs 0.384.)"""
    from models.metrics import recall_at_fir
    from models.nets import predict
    from models.train import train

    td = default_td
    cfg = TrainConfig(progress=False)
    te = td.rows(TEST)
    ivr: dict[str, float] = {}
    for kind in ("mlp", "logreg", "heuristic"):
        seeds = (1,) if kind == "heuristic" else (1, 2, 3)
        vals = [ivr_at_fpr(predict(train(td, cfg.replace(seed=seed, ensemble=1), kind)[0], td.x[te]),
                           td.purchased[te], cfg.fpr_budget) for seed in seeds]
        ivr[kind] = float(np.mean(vals))
    assert ivr["mlp"] > ivr["logreg"] > ivr["heuristic"], ivr
    is_bot, arch = td.truth(te)

    def recall(c: TrainConfig, kind: str) -> float:
        return float(np.mean([recall_at_fir(predict(train(td, c.replace(seed=seed), kind)[0], td.x[te]), is_bot,
                                            arch)["bot_recall"] for seed in (1, 2, 3)]))

    got = {"mlp": recall(cfg, "mlp"), "logreg": recall(cfg, "logreg"),
           "unweighted": recall(cfg.replace(use_weights=False), "mlp")}
    assert got["mlp"] > got["logreg"] + 0.03 and got["mlp"] > got["unweighted"] + 0.03, got


def test_degraded_profile_keeps_auc(td) -> None:  # type: ignore[no-untyped-def]
    """Issue 12: the default config (profile_dropout 0.1) scores the test split with every profile replaced by
    MISSING_PROFILE (Redis down) with an AUC close to the normal one, against the weak labels and the truth.

    Measured (MLP, default config, seeds 1-12, AUC normal - degraded): weak labels 0.017 on average over seeds
    1-3, at most 0.049 for any 3 of the 12 seeds, 0.063 for one seed; truth 0.002, 0.043, 0.067. Tolerance
    0.08 on the 3-seed mean. Nothing is asserted about profile_dropout = 0: on this small scenario its AUC gaps
    are as small (0.013 / 0.006 on seeds 1-3; early stopping ends after 4-5 epochs of 15 steps); what it
    changes here is the score level of degraded rows (at a 5%-FPR validation threshold, degraded test FPR 0.34
    on average without dropout, 0.07 with, one seed in 12 still at 0.47), too noisy per seed to assert on. On
    the default scenario the gap is clear (truth AUC 0.88 -> 0.72 without dropout, 0.85 with; models/config.py).
    """
    from models.nets import predict
    from models.train import drop_profiles, train

    te = td.rows(TEST)
    x = td.x[te]
    x_down, down = drop_profiles(x, 1.0, 0)
    assert down.all()
    is_bot = td.truth(te)[0]
    gaps: dict[str, list[float]] = {"weak": [], "truth": []}
    for seed in (1, 2, 3):
        model, _ = train(td, TrainConfig(progress=False, seed=seed), "mlp")
        s, s_down = predict(model, x), predict(model, x_down)
        gaps["weak"].append(roc_auc(s, td.label[te]) - roc_auc(s_down, td.label[te]))
        gaps["truth"].append(roc_auc(s, is_bot) - roc_auc(s_down, is_bot))
    for name, g in gaps.items():
        assert float(np.mean(g)) < 0.08, (name, gaps)


def test_group_ablation_retrains_without_each_group(td) -> None:  # type: ignore[no-untyped-def]
    """The feature-group ablation has a row per group plus the served model's, each with the test day's AUC and
    the per-archetype recall at 1% human false-invalidation; the served row is the scores given; dropping the
    per-user ad features (distinct ads, time since the same ad) costs bot recall on this data. Measured for this
    test (feature version 3, 4 epochs), bot recall all / without user_ads, training seeds 1-3: embeddings off
    0.178 / 0.128, 0.198 / 0.127, 0.133 / 0.046; embeddings on (the default) 0.160 / 0.110, 0.197 / 0.132,
    0.160 / 0.129. The user velocity and timing groups, checked here before, cost recall on some seeds only
    (with embeddings, seed 1: 0.160 all, 0.195 without user_timing)."""
    from models.nets import predict
    from models.report import group_ablation
    from models.train import train
    from stream.features import FEATURE_GROUPS

    cfg = CFG.replace(epochs=4)
    model, _ = train(td, cfg, "mlp")
    s = predict(model, td.x)
    ga = group_ablation(td, s, cfg)
    assert list(ga) == ["all", *(g for g, _ in FEATURE_GROUPS)]
    te = td.rows(TEST)
    assert ga["all"]["auc"] == roc_auc(s[te], td.label[te])
    for r in ga.values():
        assert 0.0 <= r["bot_recall"] <= 1.0 and set(r["archetypes"]) == set(ga["all"]["archetypes"])
    assert ga["user_ads"]["bot_recall"] < ga["all"]["bot_recall"], ga


def test_cli_train_calibrate_evaluate_report(small: Path, td, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from models.calibrate import global_calibration
    from models.export import score_onnx
    from models.pipeline import read_json
    from slidr.cli import app

    runner = CliRunner()
    model = tmp_path / "mlp"
    # profile_dropout=0: on this data the coverage floor of desktop:in (74 robotic clicks) alone takes 0 to 0.31
    # of the overall FPR depending on the seed (10 seeds, with and without dropout); seed 1 takes about 0.02
    # without dropout and 0.25 with 0.1, beyond the budget of 0.1 below
    sets = ["--set", "epochs=12", "--set", "hidden=[32,16]", "--set", "progress=false",
            "--set", "min_slice_purchases=10", "--set", "profile_dropout=0", "--set", "attribution_window_h=0"]
    r = runner.invoke(app, ["train", str(small), "--out", str(model), *sets])
    assert r.exit_code == 0, r.output
    manifest = read_json(model / "manifest.json")
    assert manifest["kind"] == "mlp" and set(manifest["sha256"]) == {"model.onnx", "calibration.json", "explain.onnx"}
    # an ensemble (TrainConfig.ensemble, 5) has its member 0 beside it for the reason codes' occlusion call
    assert manifest["explainer"] == {"file": "explain.onnx", "of": "member 0 of 5"}
    # reason codes' references: the median of the training split's weak-labelled human clicks, per feature,
    # overall and per slice; a slice's reference holds that slice's logged-in and platform values
    from stream.features import FEATURE_NAMES

    tr_human = td.rows(TRAIN) & (td.label == 0)
    ref = manifest["reason_reference"]
    from stream.features import CATEGORIES

    med = np.median(td.x[tr_human], axis=0)
    med[[FEATURE_NAMES.index(n) for n, _ in CATEGORIES]] = 0.0  # a category's reference is bucket 0 (unknown)
    assert ref["all"] == pytest.approx(med.tolist(), abs=1e-5)
    counts = {sl: int((tr_human & (td.slices == sl)).sum()) for sl in set(td.slices.tolist())}
    assert set(ref["slices"]) == {sl for sl, n in counts.items() if n >= REFERENCE_MIN_ROWS}, counts
    assert ref["slices"], counts  # the logged-in slices have enough here (logged-out ones: purchases only)
    for sl, v in ref["slices"].items():
        med = np.median(td.x[tr_human & (td.slices == sl)], axis=0)
        med[[FEATURE_NAMES.index(n) for n, _ in CATEGORIES]] = 0.0
        assert v == pytest.approx(med.tolist(), abs=1e-5)
        platform, _, who = sl.partition(":")
        assert v[FEATURE_NAMES.index("logged_in")] == (1.0 if who == "in" else 0.0)
        assert v[FEATURE_NAMES.index(f"platform_{platform}")] == 1.0
    # ~85 purchasing clicks in validation: the 50% coverage floors alone need an FPR of about 0.06 here
    r = runner.invoke(app, ["calibrate", str(model), str(small), "--fpr-budget", "0.1"])
    assert r.exit_code == 0, r.output
    cal = read_json(model / "calibration.json")
    assert cal["method"] == "slice"

    # slice-level beats global at the same budget and under the same per-slice cap (as the report compares them:
    # the plain global threshold need not keep the cap, so it is no bound) on the calibration data; every slice
    # meets its floor
    cfg = TrainConfig.from_dict(read_json(model / "manifest.json")["config"])
    va = td.rows(VAL)
    s = score_onnx(model / "model.onnx", td.x[va])
    thr = row_thresholds(td.slices[va], cal["thresholds"], cal["default_threshold"])
    sl = rates(s >= thr, td.purchased[va], td.heavy[va])
    gl = global_calibration(s, td.purchased[va], td.heavy[va], td.slices[va], 0.1, cfg.coverage_floor,
                            cfg.curve_points, cfg.slice_cap(0.1), cfg.min_slice_purchases,
                            td.labelled_human()[va])["validation"]["overall"]
    assert sl["fpr"] <= 0.1 and gl["fpr"] <= 0.1 and cal["validation"]["global_at_budget"]["fpr"] <= 0.1
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
    # the LightGBM reference (train extra) beside the MLP, and the weak-label rules side by side
    figures = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert "## LightGBM reference (not served)" in text
    ref = figures["lightgbm_reference"]
    assert ref["trees"] >= 1 and 0.5 < ref["auc"]["lightgbm"] <= 1.0
    assert set(ref["lightgbm"]["archetypes"]) == set(ref["mlp"]["archetypes"])
    rules = figures["label_audit"]["rules_train"]
    assert set(rules) == {"slidr", "rfm_needs_history", "as_trained"}
    # the purchase sessions (on by default) call more humans human than the purchases and RFM scores alone
    assert rules["as_trained"]["human_recall"] > rules["rfm_needs_history"]["human_recall"]
    # every kind beside the served one, each learned kind with the validation loss that chooses between them
    bl = figures["baselines"]
    assert set(bl) == {"mlp (served)", "dcn", "logreg", "heuristic"}
    assert bl["mlp (served)"]["val_loss"] == manifest["training"]["best_val_loss"]
    assert all(0.0 < bl[k]["val_loss"] < 1.0 for k in ("dcn", "logreg")) and "val_loss" not in bl["heuristic"]
    assert set(bl["dcn"]["archetypes"]) == set(bl["mlp (served)"]["archetypes"])
    # the served AUC's bootstrap interval, and the recall on ads no bot targeted in the training rows
    lo, hi = bl["mlp (served)"]["auc_ci95"]
    assert lo < bl["mlp (served)"]["auc"] < hi and "bootstrap 95% interval" in text
    unseen = figures["archetypes"]["at_1pct_fir"]["unseen_target_ads"]
    assert unseen["n"] > 0 and 0.0 <= unseen["recall_at_1pct_fir"] <= 1.0 and "no bot clicked in the training" in text


@needs_shared(TALKINGDATA_CSV)
def test_talkingdata_trains_calibrates_reports(tmp_path: Path) -> None:
    from models.data.talkingdata import import_talkingdata
    from models.pipeline import build_model

    data = tmp_path / "td"
    import_talkingdata(TALKINGDATA, data)
    summary = build_model(data, tmp_path / "model", "mlp", cfg=CFG, report_dir=tmp_path / "rep")
    assert summary["evaluation"]["overall"]["n"] > 0
    assert (tmp_path / "rep" / "report.md").exists()
