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
