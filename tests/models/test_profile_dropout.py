"""Profile dropout (issue 12): training rows scored as if the Redis profile cache were down.

The end-to-end check (degraded-mode AUC on the small scenario) is in test_pipeline.py, next to its data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")

from models.config import TrainConfig
from models.labels import TEST, TRAIN, VAL
from models.train import PROFILE_FEATURES, TrainingData, drop_profiles
from stream.features import FEATURE_NAMES, MISSING_PROFILE, N_FEATURES

PROF = [FEATURE_NAMES.index(n) for n in PROFILE_FEATURES]
OTHER = [i for i in range(N_FEATURES) if i not in PROF]


def _features(n: int, seed: int = 0) -> np.ndarray:
    """Random rows with profile columns as a reachable cache gives them."""
    rng = np.random.default_rng(seed)
    x = rng.exponential(3.0, (n, N_FEATURES)).astype(np.float32)
    known = rng.random(n) < 0.5
    x[:, PROF[0]] = np.where(known, rng.random(n), -1.0)
    x[:, PROF[1]] = known
    x[:, PROF[2]] = np.where(known, rng.integers(0, 3000, n), -1.0)
    x[:, PROF[3]] = rng.random(n) < 0.1
    return x


def _training_data(n: int = 3000) -> TrainingData:
    rng = np.random.default_rng(1)
    ts = np.sort(rng.integers(0, 3 * 86_400_000, n)).astype(np.int64)
    split = np.full(n, TRAIN, dtype=np.int8)
    split[n // 2:] = VAL
    split[3 * n // 4:] = TEST
    return TrainingData(x=_features(n), label=(rng.random(n) < 0.7).astype(np.int8),
                        purchased=rng.random(n) < 0.05, heavy=rng.random(n) < 0.1,
                        slices=np.full(n, "desktop:in"), logged_in=rng.random(n) < 0.5, ts=ts,
                        hour=(ts // 3_600_000) % 24, dow=(ts // 86_400_000) % 7, split=split,
                        usable=np.ones(n, dtype=bool))


def test_profile_features_are_the_cached_ones() -> None:
    assert FEATURE_NAMES[-4:] == PROFILE_FEATURES and len(MISSING_PROFILE) == len(PROFILE_FEATURES)


def test_drop_profiles_replaces_a_seeded_share_of_rows() -> None:
    x = _features(20_000)
    before = x.copy()
    out, mask = drop_profiles(x, 0.05, 1)
    assert np.array_equal(x, before)  # the input is left as it is
    assert 0.04 < mask.mean() < 0.06  # binomial sd 0.0015
    assert (out[np.ix_(mask, PROF)] == np.asarray(MISSING_PROFILE, dtype=np.float32)).all()
    assert np.array_equal(out[~mask], x[~mask]) and np.array_equal(out[:, OTHER], x[:, OTHER])
    assert (x[:, PROF[3]] >= 0).all() and (out[mask, PROF[3]] == -1).all()  # -1 marks "cache down"

    again, mask2 = drop_profiles(x, 0.05, 1)
    assert np.array_equal(mask, mask2) and np.array_equal(out, again)
    assert not np.array_equal(mask, drop_profiles(x, 0.05, 2)[1])

    none, m0 = drop_profiles(x, 0.0, 1)
    assert not m0.any() and np.array_equal(none, x)
    assert drop_profiles(x, 1.0, 1)[1].all()
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="profile_dropout"):
            drop_profiles(x, bad, 1)


@pytest.mark.parametrize("kind", ["mlp", "logreg", "heuristic"])
def test_train_drops_profiles_of_training_rows_only(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import models.train as T

    td = _training_data()
    x0 = td.x.copy()
    calls: list[dict[str, Any]] = []

    def spy(x: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        out, mask = drop_profiles(x, share, seed)
        calls.append({"x": x.copy(), "share": share, "seed": seed, "out": out})
        return out, mask

    monkeypatch.setattr(T, "drop_profiles", spy)
    cfg = TrainConfig(epochs=1, progress=False, profile_dropout=0.2, seed=7, ensemble=1)  # one network's training
    model, _ = T.train(td, cfg, kind)
    assert np.array_equal(td.x, x0)  # validation / test rows (and the data) untouched
    if kind == "heuristic":
        assert calls == []
        return
    assert len(calls) == 1
    c = calls[0]
    assert np.array_equal(c["x"], td.x[td.rows(TRAIN)]) and (c["share"], c["seed"]) == (0.2, 7)
    # normalisation statistics come from the rows the model trains on, degraded ones included
    dc = PROF[3]
    assert float(model.norm.mean[dc]) == pytest.approx(float(c["out"][:, dc].astype(np.float64).mean()), abs=1e-6)
    assert bool(model.norm.keep[PROF[0]]) is False  # rfm_score stays dropped inside the graph
