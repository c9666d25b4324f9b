"""Scoring: model folder checks, batch scores, decisions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from schemas.events import decode_decision
from stream import features as F
from stream import scoring, toymodel
from tests.stream.helpers import traffic


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return toymodel.build(tmp_path / "m1", version="toy-t", threshold=0.6)


def test_load_and_score_matches_numpy(model_dir: Path) -> None:
    m = scoring.load_model(model_dir, "TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider")
    assert m.version == "toy-t" and m.provider in m.session.get_providers()
    X = F.featurize(traffic(500, seed=2), {})
    s = scoring.score_batch(m, X)
    assert s.shape == (500,) and s.dtype == np.float32
    # the same logistic in numpy
    w = np.zeros(F.N_FEATURES)
    for k, v in toymodel._WEIGHTS.items():
        w[F.FEATURE_NAMES.index(k)] = v / toymodel._SCALE.get(k, 1.0)
    ref = 1 / (1 + np.exp(-(X.astype(np.float64) @ w - 2.0)))
    assert np.allclose(s, ref, atol=1e-5)
    # batching does not change a click's score
    assert np.allclose(np.concatenate([scoring.score_batch(m, X[i:i + 1]) for i in range(20)]), s[:20])


def test_refuses_feature_spec_mismatch(tmp_path: Path) -> None:
    d = toymodel.build(tmp_path / "bad", feature_spec_hash="0" * 64)
    with pytest.raises(scoring.ModelError, match="feature spec"):
        scoring.load_model(d)


def test_a_model_trained_with_another_shard_count_is_refused_by_name(tmp_path: Path) -> None:
    """A worker set up with other SLIDR_COMBO_SHARDS than the model's training computes other features: the error
    names both counts and the setting."""
    other = F.COMBO_SHARDS * 3
    d = toymodel.build(tmp_path / "other", feature_spec_hash="1" * 64, combo_shards=other)
    with pytest.raises(scoring.ModelError, match=rf"combo_shards={other} but this process has {F.COMBO_SHARDS} "
                                                 r"\(SLIDR_COMBO_SHARDS\)"):
        scoring.load_model(d)
    assert orjson.loads((toymodel.build(tmp_path / "same") / "manifest.json").read_bytes())["combo_shards"] == \
        F.COMBO_SHARDS


def test_refuses_tampered_model(model_dir: Path) -> None:
    man = orjson.loads((model_dir / "manifest.json").read_bytes())
    man["sha256"]["model.onnx"] = "f" * 64
    (model_dir / "manifest.json").write_bytes(orjson.dumps(man))
    with pytest.raises(scoring.ModelError, match="sha256"):
        scoring.load_model(model_dir)


def test_active_model_dir(tmp_path: Path) -> None:
    with pytest.raises(scoring.ModelError, match="no active model"):
        scoring.active_model_dir(tmp_path)
    d = toymodel.build_registry(tmp_path / "reg", version="v7")
    assert scoring.active_model_dir(tmp_path / "reg") == d


def test_decide_thresholds_per_slice(model_dir: Path) -> None:
    m = scoring.load_model(model_dir)
    m.thresholds["mobile:out"] = 0.9
    cs = traffic(6, seed=5)
    scores = np.array([0.1, 0.95, 0.6, 0.7, 0.599, float("nan")], dtype=np.float32)
    ds = scoring.decide(m, cs, scores, decided_at=cs[0].ts + 5, revision=2)
    for c, s, d in zip(cs, scores, ds, strict=True):
        thr = 0.9 if c.slice == "mobile:out" else 0.6
        assert d.threshold == thr and d.slice == c.slice and d.click_id == c.click_id
        assert d.valid == (not (s >= thr)) if s == s else not d.valid
        assert d.revision == 2 and d.event_ts == c.ts and d.advertiser_id == c.advertiser_id
        assert decode_decision(d.to_json()) == d  # what goes on the wire passes the strict schema
    # the worker's hot path writes the dicts straight to the wire: the very bytes of the models
    dicts = scoring.decision_dicts(m, cs, scores, decided_at=cs[0].ts + 5, revision=2)
    assert [orjson.dumps(x) for x in dicts] == [d.to_json() for d in ds]


def test_only_providers_that_load_are_asked_for(model_dir: Path, capfd: pytest.CaptureFixture[str],
                                                caplog: pytest.LogCaptureFixture) -> None:
    """The worker's default providers: nothing from onnxruntime on stderr/stdout (its "EP Error" banners and
    "Failed to load library" lines where CUDA/TensorRT libraries are missing), one log line naming the provider
    that scores and why."""
    import logging

    from slidr.settings import Settings

    with caplog.at_level(logging.INFO, logger="stream.scoring"):
        m = scoring.load_model(model_dir, Settings().onnx_providers)
    out, err = capfd.readouterr()
    assert "EP Error" not in out + err and "Failed to load" not in out + err, out + err
    lines = [r.getMessage() for r in caplog.records if "scores on" in r.getMessage()]
    assert lines == [lines[0]] and f"scores on {m.provider}: " in lines[0]
    if m.provider == "CPUExecutionProvider":  # no GPU stack here: each skipped provider says why
        assert "CUDAExecutionProvider skipped: " in lines[0]


def _reference_rows(m: scoring.Model, n: int) -> np.ndarray:
    assert m.reference is not None
    return np.repeat(m.reference[None, :], n, axis=0).astype(np.float32)


def test_reason_codes_name_the_groups_that_pushed_the_score(model_dir: Path) -> None:
    """An invalid decision's reason names the feature groups whose values raised its score over the model's
    reference click, largest push first; a group at its reference value is never named; valid decisions carry
    no reason; the reason does not depend on the other clicks of the batch."""
    m = scoring.load_model(model_dir)
    cs = traffic(4, seed=3)
    x = _reference_rows(m, 4)
    col = F.FEATURE_NAMES.index
    x[0, col("ip_datacenter")] = 1.0  # one group off its reference
    x[1, col("u_clicks_1m")] = 12.0  # two groups off: velocity pushes more than the datacenter flag here
    x[1, col("ip_datacenter")] = 1.0
    x[2, col("ip_users_1h")] = 40.0
    x[2, col("rfm_known")] = 0.0  # unknown customer: the profile group pushes too
    x[3] = m.reference  # the reference click itself: valid
    m.thresholds, m.default_threshold = {}, 0.2
    scores = scoring.score_batch(m, x)
    assert (scores[:3] >= 0.2).all() and scores[3] < 0.2, scores
    ds = scoring.decision_dicts(m, cs, scores, decided_at=cs[0].ts, features=x)
    groups = [d["reason"].partition("; pushed by ")[2].split(", ") for d in ds[:3]]
    assert groups[0] == ["ip_datacenter"]
    assert groups[1] == ["user_velocity", "ip_datacenter"]
    assert set(groups[2]) == {"ip_users", "customer_profile"}
    # the order follows the pushes: the score without each group, computed here by hand
    pushes = {}
    for g in groups[2]:
        xo = x[2:3].copy()
        for n in dict(F.FEATURE_GROUPS)[g]:
            xo[0, col(n)] = m.reference[col(n)]
        pushes[g] = float(scores[2] - scoring.score_batch(m, xo)[0])
    assert groups[2] == sorted(pushes, key=lambda g: -pushes[g])
    assert ds[3]["valid"] and ds[3]["reason"] == ""
    for d in ds[:3]:
        assert d["reason"].startswith(f"score {d['score']:.3f} >= 0.200 on {d['slice']}; pushed by ")
        assert decode_decision(orjson.dumps(d)).reason == d["reason"]  # within the schema's bounds
    # one click at a time gives the same reasons
    alone = [scoring.decision_dicts(m, [c], scoring.score_batch(m, x[i:i + 1]), decided_at=c.ts,
                                    features=x[i:i + 1])[0]["reason"] for i, c in enumerate(cs)]
    assert alone == [d["reason"] for d in ds]


def test_no_reason_codes_without_a_reference_or_features(tmp_path: Path) -> None:
    """A model whose manifest has no reference (models trained before reason codes) and a caller that passes
    no features give the plain reason; a malformed reference is refused at load."""
    plain = scoring.load_model(toymodel.build(tmp_path / "plain", reference=False, threshold=0.2))
    assert plain.reference is None
    cs = traffic(50, seed=4)
    x = F.featurize(cs, {})
    x[:, F.FEATURE_NAMES.index("ip_datacenter")] = 1.0
    s = scoring.score_batch(plain, x)
    reasons = [d["reason"] for d in scoring.decision_dicts(plain, cs, s, decided_at=0, features=x) if not d["valid"]]
    assert reasons and all("pushed by" not in r for r in reasons)
    with_ref = scoring.load_model(toymodel.build(tmp_path / "ref", threshold=0.2))
    assert all("pushed by" not in d["reason"] for d in scoring.decision_dicts(with_ref, cs, s, decided_at=0))
    bad = toymodel.build(tmp_path / "bad")
    man = orjson.loads((bad / "manifest.json").read_bytes())
    for wrong in ([0.0] * F.N_FEATURES, {"all": [0.0, 1.0]}, {"all": man["reason_reference"]["all"],
                                                              "slices": {"app:in": [float("nan")] * F.N_FEATURES}}):
        man["reason_reference"] = wrong
        (bad / "manifest.json").write_bytes(orjson.dumps(man))
        with pytest.raises(scoring.ModelError, match="reason_reference"):
            scoring.load_model(bad)


def test_reason_codes_compare_a_click_with_humans_of_its_own_slice(tmp_path: Path) -> None:
    """A slice whose typical human clicks faster has a faster reference: the same fast click is explained by its
    velocity in one slice and not in the other. The slice itself (logged-in, platform) is never a reason."""
    m = scoring.load_model(toymodel.build(tmp_path / "m", threshold=0.2,
                                          slice_references={"mobile:out": {"u_clicks_1m": 12.0}}))
    assert "slice" not in scoring.GROUP_NAMES and set(scoring.GROUP_NAMES) < set(dict(F.FEATURE_GROUPS))
    by_slice = {c.slice: c for c in traffic(300, seed=6)}
    cs = [by_slice["mobile:out"], by_slice["desktop:in"]]
    x = _reference_rows(m, 2)
    x[:, F.FEATURE_NAMES.index("u_clicks_1m")] = 12.0
    x[:, F.FEATURE_NAMES.index("ip_datacenter")] = 1.0
    ds = scoring.decision_dicts(m, cs, scoring.score_batch(m, x), decided_at=0, features=x)
    assert [d["reason"].partition("; pushed by ")[2] for d in ds] == ["ip_datacenter", "user_velocity, ip_datacenter"]


def _with_explainer(folder: Path, zero: tuple[str, ...]) -> Path:
    """The toy model with an ``explain.onnx``: the same logistic with the weights of ``zero`` set to 0 (so that
    the reasons show which network explained them)."""
    import hashlib

    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(folder / "model.onnx"))
    for i, init in enumerate(g.graph.initializer):
        if init.name == "w":
            w = numpy_helper.to_array(init).copy()
            for n in zero:
                w[F.FEATURE_NAMES.index(n), 0] = 0.0
            g.graph.initializer[i].CopyFrom(numpy_helper.from_array(w, "w"))
    raw = g.SerializeToString()
    (folder / scoring.EXPLAINER_FILE).write_bytes(raw)
    mf = orjson.loads((folder / "manifest.json").read_bytes())
    mf["explainer"] = {"file": scoring.EXPLAINER_FILE, "of": "member 0 of 5"}
    mf["sha256"][scoring.EXPLAINER_FILE] = hashlib.sha256(raw).hexdigest()
    (folder / "manifest.json").write_bytes(orjson.dumps(mf))
    return folder


def test_an_ensemble_s_reasons_come_from_its_explainer_network(model_dir: Path) -> None:
    """With ``explain.onnx`` (an ensemble's member 0) the occlusion call runs that network, on the clicks as they
    are and occluded; the decisions' scores stay the served graph's. A listed explainer that is missing or
    altered is refused like the model itself."""
    m = scoring.load_model(_with_explainer(model_dir, zero=("ip_datacenter",)))
    assert m.explainer is not None
    cs = traffic(2, seed=3)
    x = _reference_rows(m, 2)
    col = F.FEATURE_NAMES.index
    x[0, col("ip_datacenter")] = 1.0  # pushes the served score, not the explainer's
    x[1, col("u_clicks_1m")] = 12.0
    x[1, col("ip_datacenter")] = 1.0
    m.thresholds, m.default_threshold = {}, 0.2
    scores = scoring.score_batch(m, x)
    assert (scores >= 0.2).all(), scores
    ds = scoring.decision_dicts(m, cs, scores, decided_at=cs[0].ts, features=x)
    assert ds[0]["reason"] == f"score {ds[0]['score']:.3f} >= 0.200 on {ds[0]['slice']}"  # nothing named
    assert ds[1]["reason"].endswith("; pushed by user_velocity")
    assert [d["score"] for d in ds] == [float(s) for s in scores]
    (model_dir / scoring.EXPLAINER_FILE).write_bytes(b"x" + (model_dir / scoring.EXPLAINER_FILE).read_bytes())
    with pytest.raises(scoring.ModelError, match=r"explain\.onnx does not match"):
        scoring.load_model(model_dir)
    (model_dir / scoring.EXPLAINER_FILE).unlink()
    with pytest.raises(scoring.ModelError, match=r"explain\.onnx missing"):
        scoring.load_model(model_dir)
