"""Pure functions: metrics, weak labels, split, sample weights (no torch, no Kafka)."""

from __future__ import annotations

import numpy as np
import pytest

from models.labels import TEST, TRAIN, VAL, time_split, weak_labels
from models.metrics import (
    auc_interval,
    curve,
    heavy_mask,
    ivr_at_fpr,
    new_target_mask,
    rates,
    recall_at_fir,
    roc_auc,
    row_thresholds,
    threshold_at_fpr,
    truth_metrics,
)
from models.weights import label_weights, local_hour_dow

DAY = 86_400_000


def test_roc_auc_matches_pairwise_count() -> None:
    rng = np.random.default_rng(0)
    s = rng.integers(0, 20, 300).astype(float)  # many ties
    y = rng.random(300) < 0.3
    pos, neg = s[y], s[~y]
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert roc_auc(s, y) == pytest.approx(brute)
    assert np.isnan(roc_auc(s, np.zeros(300, dtype=bool)))


def test_auc_interval_holds_the_auc_and_narrows_with_more_data() -> None:
    rng = np.random.default_rng(1)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.random(n) < 0.05  # a rare positive class, as TalkingData's attributed clicks
        return rng.normal(0.0, 1.0, n) + 1.0 * y, y

    s, y = sample(2_000)
    lo, hi = auc_interval(s, y, n=400)
    assert lo < roc_auc(s, y) < hi and lo > 0.6 and hi < 0.9  # the true AUC of a unit shift is Phi(1/sqrt2) = 0.76
    s2, y2 = sample(20_000)
    lo2, hi2 = auc_interval(s2, y2, n=400)
    assert hi2 - lo2 < (hi - lo) / 2
    assert auc_interval(s, y, n=50, seed=3) == auc_interval(s, y, n=50, seed=3)  # seeded
    assert all(np.isnan(auc_interval(s, np.zeros(len(s), dtype=bool))))


def test_new_target_mask_marks_ads_no_bot_clicked_before() -> None:
    ads = np.array(["a", "b", "c", "a", "b", "c", "d"])
    bot = np.array([True, False, True, True, True, True, True])
    before = np.array([True, True, False, False, False, False, False])
    # "a" was a bot target before; "b" only a human's ad; "c" a bot's ad but not in the "before" rows; "d" new
    assert new_target_mask(ads, bot, before).tolist() == [False, True, True, False, True, True, True]


def test_curves_refuse_scores_that_are_not_probabilities() -> None:
    """Logits against the [0, 1] grid would cap every threshold at 1.0 and overstate recall at a budget."""
    logits = np.array([-3.0, 0.5, 2.0, 7.0])
    humans = np.array([True, True, False, False])
    with pytest.raises(ValueError, match="probabilities"):
        threshold_at_fpr(logits, humans, 0.01)
    with pytest.raises(ValueError, match="probabilities"):
        recall_at_fir(logits, ~humans, np.array(["h", "h", "b", "b"]))
    assert threshold_at_fpr(1 / (1 + np.exp(-logits)), humans, 0.01) > 0.5


def test_heavy_mask_counts_per_user_and_clock_hour() -> None:
    users = np.array([0, 0, 0, 1, 1, 0])
    ts = np.array([0, 1000, 2000, 0, 1000, 3_600_000])  # user 0: 3 clicks in hour 0, 1 in hour 1
    assert heavy_mask(users, ts, 2).tolist() == [True, True, True, False, False, False]


def test_rates_and_threshold_at_fpr() -> None:
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    purchased = np.array([False, True, False, True, False, False])
    heavy = np.array([True, False, True, False, False, False])
    r = rates(s >= 0.7, purchased, heavy)
    assert (r["ivr"], r["fpr"], r["coverage"]) == (0.5, 0.5, 1.0)
    assert threshold_at_fpr(s, purchased, 0.0) == pytest.approx(0.9)  # flag only above the first purchase
    assert threshold_at_fpr(s, purchased, 0.5) == pytest.approx(0.7)
    assert ivr_at_fpr(s, purchased, 0.5) == pytest.approx(0.5)
    c = curve(s, purchased, heavy)
    assert np.all(np.diff(c.thresholds) > 0) and np.all(np.diff(c.ivr) <= 0) and c.thresholds[-1] == 1.0


def test_truth_metrics_and_recall_at_fir() -> None:
    flag = np.array([True, True, False, True, False])
    bot = np.array([True, True, True, False, False])
    arch = np.array(["a", "b", "b", "human", "human"])
    t = truth_metrics(flag, bot, arch)
    assert t["bot_recall"] == pytest.approx(2 / 3) and t["human_false_invalidation"] == 0.5
    assert t["archetypes"]["b"]["invalidated"] == 0.5 and t["archetypes"]["a"]["precision"] == 0.5
    r = recall_at_fir(np.array([0.9, 0.8, 0.1, 0.5, 0.2]), bot, arch, fir=0.0)
    assert r["human_false_invalidation"] == 0.0 and r["bot_recall"] == pytest.approx(2 / 3)


def test_row_thresholds_default_for_unknown_slices() -> None:
    t = row_thresholds(np.array(["a:in", "b:out"]), {"a:in": 0.3}, 0.9)
    assert t.tolist() == [0.3, 0.9]


def test_weak_labels() -> None:
    purchased = np.array([True, False, False, False])
    rfm = np.array([0.1, 0.9, 0.2, np.nan])
    assert weak_labels(purchased, rfm, 0.7).tolist() == [0, 0, 1, 1]
    robotic = np.array([True, True, True, False])
    # a purchase stays human inside the robotic set; a high RFM score no longer does
    assert weak_labels(purchased, rfm, 0.7, robotic).tolist() == [0, 1, 1, 1]


def test_time_split_by_days_and_by_fraction() -> None:
    ts = np.arange(0, 4 * DAY, 3_600_000, dtype=np.int64)
    s = time_split(ts, 0)
    assert set(s[ts < 2 * DAY]) == {TRAIN} and set(s[(ts >= 2 * DAY) & (ts < 3 * DAY)]) == {VAL}
    assert set(s[ts >= 3 * DAY]) == {TEST}
    one_day = np.arange(0, DAY, 60_000, dtype=np.int64)
    s1 = time_split(one_day, 0, val_frac=0.25, test_frac=0.25)
    assert np.all(np.diff(s1) >= 0)  # never random across time
    assert np.bincount(s1).tolist() == pytest.approx([720, 360, 360], abs=2)


def test_label_weights_undo_each_slices_labelling_rate() -> None:
    rng = np.random.default_rng(1)
    n = 20_000
    groups = rng.choice(np.array(["app:in", "mobile:out", "desktop:out"]), n, p=[0.5, 0.3, 0.2])
    rate = np.select([groups == "app:in", groups == "mobile:out"], [0.4, 0.05], 0.0)  # desktop:out: no human label
    label = (rng.random(n) >= rate).astype(np.int8)  # 0 = human
    w = label_weights(label, groups, clip=1e9)
    human = label == 0
    assert w.mean() == pytest.approx(1.0, rel=1e-5)
    assert w[human].sum() == pytest.approx(w[~human].sum(), rel=1e-5)  # each label half the weight
    assert np.ptp(w[~human]) == pytest.approx(0.0, abs=1e-6)  # the others all weigh the same
    # a slice's human-labelled clicks together weigh in proportion to the slice's clicks, however few they are
    tot = {g: w[human & (groups == g)].sum() / (groups == g).sum() for g in ("app:in", "mobile:out")}
    assert tot["app:in"] == pytest.approx(tot["mobile:out"], rel=1e-5)
    assert w[human & (groups == "mobile:out")].min() > 7 * w[human & (groups == "app:in")].max()
    wc = label_weights(label, groups, clip=3.0)
    assert wc.max() <= 3.0 * wc.mean() * 1.01
    only = label_weights(np.ones(10, dtype=np.int8), np.array(["app:in"] * 10), clip=10.0)  # one label: all of it
    assert np.allclose(only, 1.0)
    assert label_weights(np.zeros(0, dtype=np.int8), np.array([], dtype=str), clip=10.0).shape == (0,)


def test_local_hour_uses_tz_offset() -> None:
    h, d = local_hour_dow(np.array([0], dtype=np.int64), np.array([120], dtype=np.int64))
    assert (h[0], d[0]) == (2, 3)  # 1970-01-01 02:00 local, a Thursday
