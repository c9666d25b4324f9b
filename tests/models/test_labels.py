"""Weak labels that are not mature yet (issue 16, item 8): a click is labelled only once its attribution window
(``TrainConfig.attribution_window_h``) has closed with labels flowing; younger clicks and clicks whose window
overlaps a label outage are left out of every split (``models.labels.mature_labels``,
``models.pipeline.mask_unlabelled``)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from models.config import TrainConfig
from models.labels import (
    HOUR_MS,
    TEST,
    TRAIN,
    VAL,
    labels_end_ms,
    mature_labels,
    measure_attribution_window,
    purchase_delays,
    time_split,
)

DAY_MS = 24 * HOUR_MS
W = 7 * HOUR_MS
END = 10 * DAY_MS


def test_young_clicks_at_the_end_are_not_labelled() -> None:
    ts = np.array([0, END - W - 1, END - W, END - W + 1, END - 1], dtype=np.int64)
    young, in_outage = mature_labels(ts, W, END)
    assert young.tolist() == [False, False, False, True, True]  # window [ts, ts + W) closed by END: labelled
    assert not in_outage.any()


def test_clicks_whose_window_overlaps_an_outage_are_not_labelled() -> None:
    a, b = 5 * DAY_MS, 5 * DAY_MS + 3 * HOUR_MS
    ts = np.array([a - W - 1, a - W, a - W + 1, a - 1, a, b - 1, b, b + HOUR_MS], dtype=np.int64)
    young, in_outage = mature_labels(ts, W, END, [(a, b)])
    # a purchase of the click at a - W + 1 could fall at a: lost; the one at a - W had its window closed at a
    assert in_outage.tolist() == [False, False, True, True, True, True, False, False]
    assert not young.any()
    # two outages: the union; a zero window leaves out exactly the clicks inside the outages
    _, two = mature_labels(ts, W, END, [(a, b), (b + HOUR_MS - 1, b + 2 * HOUR_MS)])
    assert two.tolist() == [False, False, True, True, True, True, True, True]
    _, inside = mature_labels(ts, 0, END, [(a, b)])
    assert inside.tolist() == ((ts >= a) & (ts < b)).tolist()


def test_end_of_labels_from_meta_or_the_last_event() -> None:
    clicks = np.array([10, 20], dtype=np.int64)
    assert labels_end_ms({"end_ms": 1000}, clicks, np.array([30], dtype=np.int64)) == 1000
    assert labels_end_ms({}, clicks, np.array([30], dtype=np.int64)) == 31  # the last purchase
    assert labels_end_ms({}, clicks, np.zeros(0, dtype=np.int64)) == 21


def test_purchase_delays_and_the_measured_window() -> None:
    clicks = [SimpleNamespace(click_id=f"k{i}") for i in range(4)]
    ts = np.array([0, HOUR_MS, 2 * HOUR_MS, 3 * HOUR_MS], dtype=np.int64)
    buys = [SimpleNamespace(click_id="k1", ts=HOUR_MS + 60_000), SimpleNamespace(click_id="k3", ts=5 * HOUR_MS),
            SimpleNamespace(click_id="other", ts=9)]  # a purchase of a click not in the data is no delay
    d = purchase_delays(ts, [c.click_id for c in clicks], [p.click_id for p in buys],
                        np.array([p.ts for p in buys], dtype=np.int64))
    assert sorted(d.tolist()) == [60_000, 2 * HOUR_MS]
    m = measure_attribution_window(SimpleNamespace(ts=ts, clicks=clicks, purchases=buys), q=1.0)
    assert m["purchases"] == 2 and m["window_h"] == pytest.approx(2.0)
    assert m["quantiles_h"]["p50"] == pytest.approx((1 / 60 + 2) / 2)


def test_short_data_is_split_on_its_labelled_span() -> None:
    ts = np.arange(0, DAY_MS, 60_000, dtype=np.int64)  # one day: cut by time fractions
    labelled = ts < DAY_MS - W
    plain = time_split(ts, 0, val_frac=0.25, test_frac=0.25)
    assert not (labelled & (plain == TEST)).any()  # the test split would be empty once the young clicks go
    cut = time_split(ts, 0, val_frac=0.25, test_frac=0.25, labelled=labelled)
    shares = [float((cut[labelled] == s).mean()) for s in (TRAIN, VAL, TEST)]
    assert shares == pytest.approx([0.5, 0.25, 0.25], abs=1e-3)
    days = np.arange(0, 4 * DAY_MS, 60_000, dtype=np.int64)  # whole days: the last day stays the test day
    assert np.array_equal(time_split(days, 0, labelled=days < 4 * DAY_MS - W), time_split(days, 0))


def _data(tmp_path: Path, outages: list[list[int]]) -> Path:
    import orjson

    from tests.models.synth import START_MS, make_dataset

    d = make_dataset(tmp_path / "d", days=4, seed=3)
    meta = orjson.loads((d / "meta.json").read_bytes())
    meta["label_outages"] = [[START_MS + a, START_MS + b] for a, b in outages]
    (d / "meta.json").write_bytes(orjson.dumps(meta))
    return d


def test_mask_applies_to_every_split_and_is_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from models.data.dataset import load_dataset
    from models.pipeline import SPLITS, load_training_data
    from tests.models.synth import START_MS

    a, b = DAY_MS + 14 * HOUR_MS, DAY_MS + 16 * HOUR_MS
    d = _data(tmp_path, [[a, b]])
    ds = load_dataset(d)
    end = labels_end_ms(ds.meta, ds.ts, np.array([p.ts for p in ds.purchases], dtype=np.int64))
    with caplog.at_level(logging.INFO, logger="models.pipeline"):
        td = load_training_data(d, TrainConfig())
    info = td.meta["label_maturity"]
    w = W + HOUR_MS  # the attribution window and the purchase sessions' hour (TrainConfig.purchase_session_h)
    assert info["window_h"] == 8.0
    young = td.ts + w > end
    before = (td.ts < START_MS + b) & (td.ts + w > START_MS + a)
    assert young.sum() > 1000 and (before & ~((td.ts >= START_MS + a) & (td.ts < START_MS + b))).sum() > 300
    for name, i in SPLITS.items():  # no split holds an unlabelled click
        assert not (td.rows(i) & (young | before)).any(), name
        assert info["labelled_by_split"][name] == int(td.rows(i).sum()) > 0
    inside = int(((td.ts >= START_MS + a) & (td.ts < START_MS + b)).sum())
    assert info["in_declared_outage"] == inside
    assert info["young"] == int(young.sum()) and info["left_out"] == int((young | before).sum()) - inside
    assert info["left_out"] == info["young"] + info["outage_overlap"] == sum(info["left_out_by_split"].values())
    assert int(td.usable.sum()) == len(td.ts) - info["left_out"] - inside
    assert f"{info['left_out']} left out as not yet labelled" in caplog.text
    # the window is a setting: 0 leaves out only the declared outage, as before
    td0 = load_training_data(d, TrainConfig(attribution_window_h=0.0))
    assert td0.meta["label_maturity"]["left_out"] == 0 and int(td0.usable.sum()) == len(td0.ts) - inside


def test_detected_label_gaps_count_as_outages_when_allowed(tmp_path: Path) -> None:
    from models.guardrails import GuardrailError
    from models.pipeline import load_training_data
    from tests.models.synth import START_MS

    d = _data(tmp_path, [])
    import orjson

    # lose every purchase of day 1, 13:00-16:00 UTC, undeclared
    lo, hi = START_MS + DAY_MS + 13 * HOUR_MS, START_MS + DAY_MS + 16 * HOUR_MS
    lines = [x for x in (d / "purchases.jsonl").read_bytes().splitlines() if not lo <= orjson.loads(x)["ts"] < hi]
    (d / "purchases.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(GuardrailError):
        load_training_data(d, TrainConfig())
    td = load_training_data(d, TrainConfig(allow_label_gaps=True))
    gaps = td.meta["label_maturity"]["detected_gap_hours"]
    assert gaps and all(lo - HOUR_MS <= h < hi for h in gaps), gaps
    for h in gaps:  # the gap hour and the window before it are left out
        assert not (td.usable & (td.ts < h + HOUR_MS) & (td.ts + W > h)).any()


def _edge_ratio(td: Any, label: np.ndarray, hours: int) -> tuple[float, list[float]]:
    """Labelled clicks' share of ``label`` in the last ``hours`` of labelled data before each edge (every outage's
    start, the data's end), against the same clock hours on the other days (the diurnal mix moves the share by
    +-15% hour to hour): observed / expected, pooled over the edges, and per edge."""
    u, ts = td.usable, td.ts
    obs = exp = 0.0
    per = []
    for e in [a for a, _ in td.meta["label_outages"]] + [td.meta["end_ms"]]:
        last = int(ts[u & (ts < e)].max()) + 1
        near = (ts >= last - hours * HOUR_MS) & (ts < last) & u
        ref = ((ts - (last - hours * HOUR_MS)) % DAY_MS < hours * HOUR_MS) & u & ~near
        obs += float(label[near].sum())
        exp += float(near.sum() * label[ref].mean())
        per.append(float(label[near].mean() / label[ref].mean()))
    return obs / exp, per


def test_human_share_does_not_dip_before_an_outage_or_at_the_end(tmp_path: Path) -> None:
    """Simulated: 3 days, 150k clicks, a 3-hour purchase outage on day 1 at 14:00 UTC, purchase rate 0.2 (the
    default's 0.03 puts ~25 purchases in an hour's bucket: noise would hide the dip). The last labelled hour
    before the outage and before the end holds its share of purchasing clicks, and the last two its share of
    human labels, against the same hours on other days.

    Measured over simulator seeds 1-10 (pooled over the two edges): before the fix the purchasing share of the
    last hour read 0.41-0.60 (mean 0.52) and the human-label share of the last two hours 0.66-0.86 (0.78); with
    the 7 h window 0.94-1.10 (1.01) and 0.93-1.10 (1.00). Tolerances 0.85 and 0.88 sit between. Seed 1: 0.556 and
    0.781 before, 1.055 and 1.017 after.
    """
    from models.data.simulate import simulate_to
    from models.pipeline import load_training_data

    d = tmp_path / "sim"
    simulate_to(d, {"name": "maturity", "start": "2026-11-02T00:00:00Z", "days": 3,
                    "clicks": 150_000, "label_outages": [{"day": 1, "hour": 14, "hours": 3}],
                    "purchase": {"rate": 0.2}}, 1)
    td = load_training_data(d, TrainConfig())
    bought, per_b = _edge_ratio(td, td.purchased, 1)
    human, per_h = _edge_ratio(td, td.label == 0, 2)
    shown = f"purchasing share, last hour: {bought:.3f} {per_b}; human-label share, last 2 hours: {human:.3f} {per_h}"
    print(shown)
    assert bought >= 0.85 and human >= 0.88, shown


def test_consistent_with_history_compares_with_the_account_s_earlier_sessions() -> None:
    from models.labels import consistent_with_history

    keys = ["c:a", "c:a", "c:a", "c:a", "c:a", "s:x", "s:x", "c:a"]
    sess = ["1", "1", "2", "3", "3", "x", "x", "4"]
    ua = ["chrome", "chrome", "chrome", "curl", "curl", "chrome", "chrome", "curl"]
    ip = ["r1", "r1", "dc9", "dc9", "dc9", "r1", "r1", "dc7"]
    got = consistent_with_history(keys, sess, ua, ip).tolist()
    # session 1 has no history (nothing contradicts it); session 2 shares the user agent; session 3 shares the /24
    # session 2 used; the logged-out key never counts; session 4's curl was seen in session 3 (history holds it)
    assert got == [True, True, True, True, True, False, False, True]
    # a run never vouches for itself: once the account has a history, its own earlier clicks are not history
    keys, sess = ["c:v"] * 4, ["own", "hijack", "hijack", "hijack"]
    assert consistent_with_history(keys, sess, ["firefox"] + ["curl"] * 3,
                                   ["r1"] + ["dc1"] * 3).tolist() == [True, False, False, False]


def test_the_history_check_only_takes_rfm_humans_away() -> None:
    from models.labels import weak_labels

    purchased = np.array([True, False, False, False])
    rfm = np.array([0.1, 0.9, 0.9, np.nan])
    consistent = np.array([False, True, False, False])
    assert weak_labels(purchased, rfm, 0.7).tolist() == [0, 0, 0, 1]
    assert weak_labels(purchased, rfm, 0.7, consistent=consistent).tolist() == [0, 0, 1, 1]


def test_first_account_sessions_and_unverified_rfm_labels() -> None:
    from models.labels import first_account_sessions, unverified_rfm

    keys = ["c:a", "c:a", "c:b", "c:a", "s:x", "c:b"]
    sess = ["1", "1", "7", "2", "x", "8"]
    first = first_account_sessions(keys, sess)
    # each account's first session in the data; a logged-out key has no account
    assert first.tolist() == [True, True, True, False, False, False]
    purchased = np.array([False, True, False, False, False, False])
    rfm = np.array([0.9, 0.9, 0.2, 0.9, np.nan, 0.9])
    robotic = np.array([False, False, False, False, False, False])
    # only a human label resting on a high RFM score alone, in a first session, is unverified (a purchase is not)
    assert unverified_rfm(purchased, rfm, 0.7, robotic, first).tolist() == [True, False, False, False, False, False]
    # a click of the robotic set is not called human by its RFM score at all, so nothing to verify
    assert not unverified_rfm(purchased, rfm, 0.7, np.ones(6, dtype=bool), first).any()


def test_unverified_rows_weigh_nothing_in_training(tmp_path: Path) -> None:
    from models.data.simulate import simulate_to
    from models.pipeline import load_training_data
    from models.train import sample_weights

    simulate_to(tmp_path / "small", "small", 1)
    cfg = TrainConfig(allow_label_gaps=True, attribution_window_h=0.0)
    td = load_training_data(tmp_path / "small", cfg)
    assert td.unverified is not None
    for split in (TRAIN, VAL):
        m = td.rows(split)
        w = sample_weights(td, m, cfg)
        assert td.unverified[m].any() and (w[td.unverified[m]] == 0).all() and (w[~td.unverified[m]] > 0).all()
    assert load_training_data(tmp_path / "small", cfg.replace(rfm_needs_history=False)).unverified is None


def test_a_purchase_vouches_for_its_own_session_within_the_window() -> None:
    from models.labels import HOUR_MS, purchase_sessions

    sess = ["a", "a", "a", "a", "b", "b", "a"]
    ts = np.array([0, 30, 90, 200, 50, 60, 100], dtype=np.int64) * 60_000  # minutes
    purchased = np.array([False, False, True, False, False, False, False])
    # session a bought at minute 90: its clicks within an hour either side (minutes 30, 90, 100) are vouched for;
    # minute 0 and minute 200 are too far; session b bought nothing
    assert purchase_sessions(sess, ts, purchased, HOUR_MS).tolist() == [False, True, True, False, False, False, True]
    assert purchase_sessions(sess, ts, purchased, 4 * HOUR_MS).tolist() == [True] * 4 + [False, False, True]
    # off: nothing, not even the purchasing click (its own purchase labels it anyway)
    assert not purchase_sessions(sess, ts, purchased, 0).any()
    assert not purchase_sessions(sess, ts, np.zeros(7, dtype=bool), HOUR_MS).any()


def test_purchase_sessions_label_human_outside_the_robotic_set_and_clear_unverified() -> None:
    from models.labels import training_labels

    purchased = np.array([True, False, False, False, False])
    rfm = np.array([np.nan, np.nan, 0.9, np.nan, np.nan])
    robotic = np.array([False, False, False, True, False])
    consistent = np.ones(5, dtype=bool)
    first = np.array([False, False, True, False, False])
    vouched = np.array([True, True, True, True, False])
    label, unverified = training_labels(purchased, rfm, 0.7, robotic, consistent, first, True)
    assert label.tolist() == [0, 1, 0, 1, 1] and unverified is not None
    assert unverified.tolist() == [False, False, True, False, False]  # RFM alone in a first session
    label, unverified = training_labels(purchased, rfm, 0.7, robotic, consistent, first, True, vouched)
    # the session's clicks are human, its robotic-set click stays robotic, and a vouched click is no longer unverified
    assert label.tolist() == [0, 0, 0, 1, 1] and unverified is not None and not unverified.any()
    label, _ = training_labels(purchased, rfm, 0.7, None, None, None, False, vouched)
    assert label.tolist() == [0, 0, 0, 0, 1]  # SLIDR's rule without a robotic set: every vouched click
