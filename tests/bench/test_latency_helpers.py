"""Pure helpers of bench/latency.py: where a click's latency goes (no services)."""

from __future__ import annotations

from types import SimpleNamespace

import orjson

from bench.latency import forwarded_at, stage_figures


def _rec(ts: int, *items: dict[str, object]) -> SimpleNamespace:
    return SimpleNamespace(timestamp=ts, value=orjson.dumps(list(items)))


def test_a_click_is_forwarded_when_its_first_by_ip_record_was_created() -> None:
    recs = [_rec(100, {"c": {"click_id": "a"}, "u": [], "p": [0, 1]}, {"w": [[0, 5]]}),
            _rec(130, {"c": {"click_id": "b"}, "u": [], "p": [1, 1]}),
            _rec(150, {"c": {"click_id": "a"}, "u": [], "p": [0, 1]})]  # a redelivered copy: the first counts
    assert forwarded_at(recs) == {b"a": 100, b"b": 130}  # (watermark beats carry no click)


def test_stage_figures_are_the_differences_of_two_scrapes() -> None:
    before = {("slidr_batch_events_count", "user"): 10.0, ("slidr_batch_events_sum", "user"): 100.0,
              ("slidr_batch_seconds_sum", "user"): 0.5, ("slidr_scoring_seconds_count", ""): 4.0,
              ("slidr_scoring_seconds_sum", ""): 0.004}
    after = {("slidr_batch_events_count", "user"): 30.0, ("slidr_batch_events_sum", "user"): 700.0,
             ("slidr_batch_seconds_sum", "user"): 0.6, ("slidr_batch_events_count", "ip"): 5.0,
             ("slidr_batch_events_sum", "ip"): 15.0, ("slidr_batch_seconds_sum", "ip"): 0.05,
             ("slidr_scoring_seconds_count", ""): 9.0, ("slidr_scoring_seconds_sum", ""): 0.009}
    f = stage_figures(before, after)
    assert f["user_batches"] == 20 and f["user_events_per_batch"] == 30.0 and f["user_batch_ms_mean"] == 5.0
    assert f["ip_batches"] == 5 and f["ip_events_per_batch"] == 3.0 and f["ip_batch_ms_mean"] == 10.0
    assert f["scoring_calls"] == 5 and f["scoring_ms_mean"] == 1.0
    assert stage_figures(after, after)["user_events_per_batch"] is None  # no batch in between: no mean
