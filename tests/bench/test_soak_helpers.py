"""Pure helpers of bench/soak.py: slope fitting and flatness, commit lag, click-id parsing (no services)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from bench.soak import FLAT_REL_PER_MIN, all_flat, commit_lag, seq_of, trend, warmup_s


def test_trend_fits_slope_per_minute_and_skips_warmup() -> None:
    t = [5.0 * k for k in range(1, 25)]  # two minutes of 5 s samples
    v = [1000.0 if x < 60 else 100.0 + 2.0 * x for x in t]  # a warm-up spike, then +120 per minute
    r = trend(t, v, skip_s=60.0)
    assert r["fit_points"] == sum(1 for x in t if x >= 60)
    assert r["slope_per_min"] == pytest.approx(120.0)
    assert r["slope_stderr_per_min"] == pytest.approx(0.0, abs=1e-6)
    assert r["first"] == 1000.0 and r["last"] == 100.0 + 2.0 * 120
    assert r["rel_slope_per_min"] == pytest.approx(120.0 / r["mean"], rel=1e-3)
    assert r["flat"] is False


def test_trend_flat_series_and_floor() -> None:
    t = [5.0 * k for k in range(1, 30)]
    flat = trend(t, [500.0 + (k % 2) for k in range(len(t))], skip_s=0.0)
    assert flat["flat"] is True and abs(flat["rel_slope_per_min"]) <= FLAT_REL_PER_MIN
    # a lag near zero: noise of a few clicks is flat against a floor of one second of clicks, not against its mean
    lag = [0.0, 3.0, 0.0, 5.0] * 7 + [6.0]
    assert trend(t, lag, 0.0)["flat"] is False
    assert trend(t, lag, 0.0, floor=1000.0)["flat"] is True


def test_trend_none_values_and_too_few_points() -> None:
    r = trend([5.0, 10.0, 15.0, 20.0], [None, None, 4.0, 4.0], skip_s=0.0)
    assert r["fit_points"] == 2 and r["flat"] is None and r["slope_per_min"] is None
    assert r["first"] == 4.0 and r["last"] == 4.0
    empty = trend([5.0], [None], 0.0)
    assert empty["first"] is None and empty["fit_points"] == 0


def test_trend_zero_level() -> None:
    assert trend([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], 0.0)["flat"] is True
    r = trend([60.0, 120.0, 180.0], [-1.0, 0.0, 1.0], 0.0)  # mean 0, rising: infinitely steep relative slope
    assert r["flat"] is False and math.isinf(r["rel_slope_per_min"])


def test_warmup_is_a_minute_or_half_a_short_run() -> None:
    assert warmup_s(600.0) == 60.0
    assert warmup_s(120.0) == 60.0
    assert warmup_s(60.0) == 30.0


def test_commit_lag() -> None:
    assert commit_lag({0: 10, 1: 10}, {0: -1, 1: -1}, {0: 0, 1: 0}) is None
    assert commit_lag({0: 10, 1: 10}, {}, {}) is None
    assert commit_lag({0: 10, 1: 12}, {0: 7, 1: 12}, {0: 0, 1: 0}) == 3
    assert commit_lag({0: 10, 1: 12}, {0: 7, 1: -1}, {0: 0, 1: 2}) == 3 + 10  # uncommitted: from its start


def test_seq_of() -> None:
    assert seq_of(b"soak123") == 123
    assert seq_of(b"c12") is None and seq_of(None) is None and seq_of(b"soakx") is None


def test_all_flat() -> None:
    m: dict[str, dict[str, Any]] = {"a": {"flat": True, "fit_points": 5}, "commit_lag": {"flat": None, "fit_points": 0}}
    assert all_flat(m) is True
    assert all_flat({**m, "b": {"flat": False, "fit_points": 5}}) is False
    assert all_flat({**m, "b": {"flat": None, "fit_points": 2}}) is None
