"""The realism audit's measures on hand-made columns (what it would flag, what it must not)."""

from __future__ import annotations

import numpy as np

from models.data.audit import field_separation, weighted_auc
from models.metrics import roc_auc


def test_weighted_auc_matches_unweighted_and_counts_weights() -> None:
    r = np.random.default_rng(0)
    s = r.integers(0, 5, size=400).astype(float)  # many ties
    y = r.random(400) < 0.3
    assert abs(weighted_auc(s, y, np.ones(400)) - roc_auc(s, y)) < 1e-12
    # a negative with weight 3 counts as three copies of it
    s2, y2 = np.array([0.1, 0.5, 0.9]), np.array([False, False, True])
    assert weighted_auc(s2, y2, np.array([3.0, 1.0, 1.0])) == 1.0
    assert abs(weighted_auc(np.array([0.1, 0.5, 0.3]), y2, np.array([3.0, 1.0, 1.0])) - 0.75) < 1e-12


def test_a_value_only_bots_share_is_flagged_one_unique_per_key_is_not() -> None:
    r = np.random.default_rng(1)
    n = 4000
    pos = r.random(n) < 0.2
    fold = r.integers(0, 2, size=n).astype(np.int8)
    w = np.ones(n)
    shared = np.where(pos, 999, r.integers(0, 20, size=n))  # every bot on one value no human has
    res = field_separation(shared, pos, w, fold)
    assert res["auc"] > 0.99 and res["unseen"] == 1.0
    unique = np.arange(n)  # a fresh value per click (a residential /24, a session id): says nothing
    res = field_separation(unique, pos, w, fold)
    assert abs(res["auc"] - 0.5) < 1e-9 and res["unseen"] == 1.0
    noise = r.integers(0, 20, size=n)  # same distribution for both: close to 0.5
    assert abs(field_separation(noise, pos, w, fold)["auc"] - 0.5) < 0.05


def test_one_way_fit_scores_only_the_later_rows() -> None:
    pos = np.array([True, False, True, False, True, False])
    code = np.array([1, 2, 1, 2, 3, 3])  # the bots' value of the early rows is gone in the later ones
    fold = np.array([-1, -1, -1, -1, 2, 2], dtype=np.int8)
    res = field_separation(code, pos, np.ones(6), fold)
    assert res["auc"] == 0.5
    res = field_separation(np.array([1, 2, 1, 2, 1, 2]), pos, np.ones(6), fold)
    assert res["auc"] == 1.0


def test_label_audit_counts_what_the_weak_labels_call_human() -> None:
    from models.labels import label_audit

    label = np.array([0, 0, 1, 1, 0, 1], dtype=np.int8)  # 0 = called human
    is_bot = np.array([False, True, False, True, False, True])
    arch = np.array(["human", "compromised", "human", "bursty", "human", "compromised"])
    a = label_audit(label, is_bot, arch)
    assert a["human_precision"] == 2 / 3 and a["human_recall"] == 2 / 3 and a["bots_called_human"] == 1 / 3
    assert a["archetypes"]["compromised"] == {"n": 2, "called_human": 0.5}
    assert a["archetypes"]["bursty"]["called_human"] == 0.0
