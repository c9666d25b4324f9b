"""Retrain guardrails (issue 9): data checks and their report, model checks against the stable model, and
slidr retrain on a dataset folder (refusals never promote; once per window)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from models import guardrails as G
from slidr.settings import Settings

HOUR_MS = 3_600_000
MON = 1_793_577_600_000  # 2026-11-02T00:00:00Z, a Monday (the simulator's start)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One simulated day with the scenario's 2-hour purchase outage (15:00-17:00 UTC), declared in meta.json."""
    from models.data.simulate import simulate_to

    out = tmp_path_factory.mktemp("small")
    simulate_to(out, "small", 1)
    return out


def _undeclared(src: Path, dst: Path) -> Path:
    """The same folder with the outage undeclared: what the stream sees (nobody tells it about outages)."""
    shutil.copytree(src, dst)
    meta = orjson.loads((dst / "meta.json").read_bytes())
    meta["label_outages"] = []
    (dst / "meta.json").write_bytes(orjson.dumps(meta))
    return dst


def test_label_outage_in_the_window_is_refused_and_the_report_names_the_hours(small: Path, tmp_path: Path) -> None:
    from models import registry
    from models.retrain import retrain

    s = Settings(registry_path=tmp_path / "reg")
    res = retrain(data_dir=_undeclared(small, tmp_path / "undeclared"), settings=s)
    assert res["status"] == "refused" and "evaluation" not in res  # refused before training
    failed = {c["name"]: c for c in res["report"]["checks"] if not c["ok"]}
    assert "label_gaps" in failed, res["report"]["failed"]
    assert failed["label_gaps"]["values"]["hours"] == ["2026-11-02 15:00 UTC", "2026-11-02 16:00 UTC"]
    assert "2026-11-02 15:00 UTC, 2026-11-02 16:00 UTC" in failed["label_gaps"]["detail"]
    record = orjson.loads(Path(res["record"]).read_bytes())
    assert record["status"] == "refused" and record["report"]["failed"] == res["report"]["failed"]
    assert registry.versions(s) == [] and registry.active_version(s) is None
    # declared, the same hours are left out of training (as slidr train does) and the checks pass
    ts, bought, slices, buy_ts, outages = _columns(small)
    ok = G.data_checks(np.zeros((0, 25), dtype=np.float32), ts, bought, slices, buy_ts, Settings(), outages=outages)
    assert ok.ok, ok.lines()


def _columns(data: Path) -> tuple[Any, ...]:
    from models.data.dataset import load_dataset

    ds = load_dataset(data)
    keep = ~ds.in_label_outage(ds.ts)
    return (ds.ts[keep], ds.purchased[keep], np.array([c.slice for c in ds.clicks])[keep],
            np.array([p.ts for p in ds.purchases], dtype=np.int64), ds.label_outages)


def test_purchase_density_per_hour_of_the_week() -> None:
    ts = np.repeat(MON + np.arange(48) * HOUR_MS, 400)  # two days, 400 clicks an hour
    bought = np.zeros(len(ts), dtype=bool)
    bought[::50] = True  # 2% everywhere ...
    tue_03 = (ts >= MON + 27 * HOUR_MS) & (ts < MON + 28 * HOUR_MS)
    bought[tue_03] = False
    bought[np.flatnonzero(tue_03)[0]] = True  # ... but one purchase in 400 clicks on Tuesday 03:00
    c = G.check_purchase_density(ts, bought, 0.005, 300)
    assert not c.ok and c.values["hours"] == [27] and "Tue 03:00 UTC (400 clicks, 1 purchases)" in c.detail
    assert G.check_purchase_density(ts, bought, 0.002, 300).ok
    assert G.check_purchase_density(ts, bought, 0.005, 500).ok  # too few clicks an hour to judge


def test_label_gaps_come_from_the_purchase_times() -> None:
    ts = np.repeat(MON + np.arange(24) * HOUR_MS, 600)
    bought = np.zeros(len(ts), dtype=bool)
    bought[::40] = True
    buy_ts = ts[bought] + 20 * 60_000
    lost = (buy_ts >= MON + 10 * HOUR_MS) & (buy_ts < MON + 11 * HOUR_MS)
    c = G.check_label_gap_hours(ts, bought, buy_ts[~lost], 1e-4)
    assert not c.ok and c.values["hours"] == ["2026-11-02 10:00 UTC"]
    assert G.check_label_gap_hours(ts, bought, buy_ts, 1e-4).ok
    assert G.check_label_gap_hours(ts, bought, buy_ts[~lost], 1e-4, [(MON + 10 * HOUR_MS, MON + 11 * HOUR_MS)]).ok


def test_slice_volume_against_the_previous_window() -> None:
    ts = MON + np.arange(4000, dtype=np.int64) * 60_000
    prev = G.slice_volume(ts, np.array(["app:in"] * 2000 + ["web"] * 2000))
    now = G.slice_volume(ts, np.array(["app:in"] * 500 + ["web"] * 3500))
    c = G.check_volume(now, prev, 3.0, 100)
    assert not c.ok and "app:in 0.25x" in c.detail and "web" not in c.detail
    assert G.check_volume(now, prev, 5.0, 100).ok
    assert G.check_volume(now, None, 3.0, 100).ok


def test_non_finite_features_are_named() -> None:
    from stream.features import FEATURE_NAMES

    x = np.zeros((10, len(FEATURE_NAMES)), dtype=np.float32)
    assert G.check_non_finite(x, FEATURE_NAMES).ok
    x[3, FEATURE_NAMES.index("u_gap_s")] = np.nan
    c = G.check_non_finite(x, FEATURE_NAMES)
    assert not c.ok and c.values == {"columns": ["u_gap_s"], "rows": 1}


def _slices(**ivr: float) -> dict[str, Any]:
    return {"slices": {sl: {"ivr": v, "fpr": 0.01, "coverage": 0.8, "n_purchased": 100, "n_robotic": 100}
                       for sl, v in ivr.items()}}


def test_model_checks_bounds() -> None:
    s = Settings()
    assert G.model_checks(_slices(a=0.12, b=0.30), _slices(a=0.10, b=0.28), s).ok
    r = G.model_checks(_slices(a=0.50, b=0.30), _slices(a=0.10, b=0.28), s)
    assert {c.name for c in r.failed()} == {"ivr_delta:a", "ivr_ratio:a"}
    assert [line.split(":")[0] for line in r.lines()] == ["FAIL model.ivr_delta", "FAIL model.ivr_ratio"]
    worse = _slices(a=0.10)
    worse["slices"]["a"] |= {"fpr": 0.05, "coverage": 0.5}
    r = G.model_checks(worse, _slices(a=0.10), s)
    assert {c.name for c in r.failed()} == {"fpr_delta:a", "coverage_drop:a"}
    worse["slices"]["a"]["fpr"] = 0.2
    r = G.model_checks(worse, None, s)  # no stable model: the FPR ceiling still applies
    assert {c.name for c in r.failed()} == {"fpr_max:a"}


def test_rfm_labels_from_the_logged_features_equal_the_trainers(small: Path) -> None:
    """The stream path reads the RFM score from the features (rfm_score where rfm_known): same weak labels (the
    account-history check given the same clicks' ``consistent_with_history``, the purchase sessions given their
    session ids)."""
    from models.config import TrainConfig
    from models.data.dataset import load_dataset
    from models.retrain import training_data
    from models.train import build_training_data
    from stream.features import FEATURE_NAMES

    cfg = TrainConfig(allow_label_gaps=True)
    ds = load_dataset(small)
    td = build_training_data(ds, cfg)
    x = td.x
    rfm = np.where(x[:, FEATURE_NAMES.index("rfm_known")] > 0.5, x[:, FEATURE_NAMES.index("rfm_score")], np.nan)
    got = training_data(x, td.ts, td.purchased, rfm.astype(np.float64), [c.user_key for c in ds.clicks],
                        [c.slice for c in ds.clicks], [c.logged_in for c in ds.clicks],
                        np.array([c.tz_offset_min or 0 for c in ds.clicks]), cfg, {"start_ms": ds.meta["start_ms"]},
                        [c.session_id for c in ds.clicks], td.rfm_consistent)
    assert cfg.rfm_needs_history and td.rfm_consistent is not None and cfg.purchase_session_h > 0
    assert (td.label == 0).sum() > (td.purchased).sum()  # the RFM rule labels some clicks human
    assert td.unverified is not None and td.unverified.any()
    for f in ("label", "heavy", "hour", "dow", "split", "unverified"):
        assert np.array_equal(getattr(got, f), getattr(td, f)), f


@pytest.mark.train
def test_a_broken_model_is_refused_and_never_promoted(small: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A good retrain is promoted (and becomes stable: the registry's first); a retrain whose thresholds invalidate
    half of all clicks is refused by the model guardrail and ACTIVE stays; a second run of a window does nothing."""
    pytest.importorskip("torch")
    pytest.importorskip("cvxpy")
    from models import pipeline, registry
    from models.config import TrainConfig
    from models.labels import TEST
    from models.retrain import retrain

    # attribution_window_h 0: on the one-day small scenario the 7 h window leaves too few test clicks per slice
    # (app:in: 22 purchasing clicks, FPR 0.23 > the 0.1 ceiling); this test is about refusing a broken model
    cfg = TrainConfig(epochs=12, hidden=(32, 16), progress=False, fpr_budget=0.05, coverage_floor=0.0,
                      min_slice_purchases=10, attribution_window_h=0.0)
    # guard_max_fpr 0.25 (default 0.1): the good model's test day has 27 purchasing clicks in mobile:in, so one
    # click is 0.037 of FPR; with the purchase sessions in the labels it invalidated 3 of them (0.111, training seeds
    # 1 and 2) at a 0.05 budget, and with the labels' per-slice weights (models.weights) 14 of 82 in desktop:in
    # (0.171): one short day calibrated on a quarter of it. The broken model is refused on its IVR either way
    s = Settings(registry_path=tmp_path / "reg", guard_max_fpr=0.25)
    good = retrain(data_dir=small, cfg=cfg, settings=s)
    assert good["status"] == "promoted", good["report"]["failed"]
    assert registry.active_version(s) == registry.stable_version(s) == good["version"]
    assert retrain(data_dir=small, cfg=cfg, settings=s)["status"] == "done"  # same window: nothing

    real = pipeline.calibrate_dir

    def broken(model_dir: Path, *a: Any, **kw: Any) -> dict[str, Any]:
        cal = real(model_dir, *a, **kw)
        from models.export import score_onnx

        td = a[3] if len(a) > 3 else kw["td"]
        te = td.rows(TEST)
        half = float(np.median(score_onnx(model_dir / "model.onnx", td.x[te])))  # half of the evaluation window
        cal |= {"default_threshold": half, "thresholds": dict.fromkeys(cal["thresholds"], half)}
        pipeline.write_json(model_dir / "calibration.json", cal)
        pipeline._refresh_manifest(model_dir, model_version="broken-half")
        return cal

    monkeypatch.setattr(pipeline, "calibrate_dir", broken)
    bad = retrain(data_dir=small, cfg=cfg.replace(seed=2), settings=s)  # another config: another key
    assert bad["status"] == "refused"
    failed = bad["report"]["failed"]
    assert any(f.startswith("model.ivr_delta:") for f in failed) and any(f.startswith("model.ivr_ratio:")
                                                                         for f in failed), failed
    assert not any(f.startswith("data.") for f in failed)
    cand = bad["model_metrics"]["candidate"]["overall"]["ivr"]
    print(f"broken candidate IVR {cand:.3f} vs stable {bad['model_metrics']['stable']['overall']['ivr']:.3f}: "
          f"{len(failed)} failed checks")
    assert 0.45 < cand < 0.55
    assert registry.active_version(s) == good["version"] and "broken-half" not in registry.versions(s)
    assert [e["action"] for e in registry.history(s)] == ["register", "promote", "mark_stable"]


def test_one_retrain_per_window_at_a_time(tmp_path: Path) -> None:
    from models.retrain import _window_lock

    s = Settings(registry_path=tmp_path / "reg")
    with _window_lock(s, "w1"):
        busy = pytest.raises(RuntimeError, match="another slidr retrain of this window is running")
        with busy, _window_lock(s, "w1"):
            pass
        with _window_lock(s, "w2"):  # another window: free
            pass
    with _window_lock(s, "w1"):  # released
        pass
