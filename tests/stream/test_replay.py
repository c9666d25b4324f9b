"""Replay's pure parts: range bounds, the replay id, the correction rule, the by-ip sequencing (no broker)."""

from __future__ import annotations

import orjson
import pytest

from stream.replay import (
    Latest,
    Range,
    ReplayError,
    Tally,
    correction,
    latest_of,
    needed,
    parse_bound,
    range_of,
    replay_id,
    sequence,
    warmup_start,
)
from stream.stages import FORWARDED


def test_bounds_are_offsets_or_times() -> None:
    assert parse_bound("0:10,3:7") == {0: 10, 3: 7}
    assert parse_bound("1762000000000") == 1_762_000_000_000
    assert parse_bound("2025-11-01T12:26:40Z") == 1_762_000_000_000
    assert parse_bound("2025-11-01T12:26:40") == 1_762_000_000_000  # no zone: UTC
    with pytest.raises(ReplayError, match="not a range bound"):
        parse_bound("yesterday")


def test_range_clamps_to_the_log_and_leaves_unnamed_partitions_out() -> None:
    bounds = ({0: 5, 1: 0, 2: 0}, {0: 100, 1: 50, 2: 80})
    times = {1000: {0: 20, 1: 10, 2: 80}}.__getitem__
    r = range_of({0: 0, 1: 40}, {0: 500, 1: 45}, times, bounds, 3)
    assert (r.start, r.end) == ({0: 5, 1: 40}, {0: 100, 1: 45})
    r = range_of(1000, {0: 30, 1: 30, 2: 90}, times, bounds, 3)
    assert (r.start, r.end, r.size()) == ({0: 20, 1: 10}, {0: 30, 1: 30}, 30)  # partition 2: empty from 80
    with pytest.raises(ReplayError, match="holds no click"):
        range_of({0: 200}, {0: 300}, times, bounds, 3)


def test_replay_id_follows_the_parameters() -> None:
    r = Range({0: 1}, {0: 9})
    a = replay_id(r, "m1", "rescore", False)
    assert a == replay_id(Range({0: 1}, {0: 9}), "m1", "rescore", False) and a.startswith("r-")
    assert len({a, replay_id(r, "m2", "rescore", False), replay_id(r, "m1", "recompute", False),
                replay_id(r, "m1", "rescore", True), replay_id(Range({0: 2}, {0: 9}), "m1", "rescore", False)}) == 5


def _d(valid: bool, cpc: float = 1.0) -> dict[str, object]:
    return {"click_id": "c", "valid": valid, "slice": "app:out", "advertiser_id": "a", "cpc": cpc, "revision": 0,
            "replay_id": None}


def test_correction_rule() -> None:
    live = Latest(0, True, False, None)
    assert correction(_d(True), live, "r-1", False) is None  # unchanged
    out = correction(_d(False), live, "r-1", False)
    assert out is not None and (out["revision"], out["replay_id"], out["valid"]) == (1, "r-1", False)
    assert correction(_d(True), live, "r-1", True)["revision"] == 1  # type: ignore[index]  # --all
    assert correction(_d(True), Latest(0, True, True, None), "r-1", False) is not None  # degraded: re-sent
    assert correction(_d(False), Latest(3, True, False, "r-1"), "r-1", True) is None  # this replay's own: never
    assert correction(_d(False), Latest(3, True, False, "r-0"), "r-1", False)["revision"] == 4  # type: ignore[index]
    assert correction(_d(False), None, "r-1", False)["revision"] == 1  # type: ignore[index]  # never decided


def test_latest_and_tally() -> None:
    recs = [orjson.dumps({"click_id": "a", "valid": True, "revision": 0, "cpc": 1.0}),
            orjson.dumps({"click_id": "a", "valid": False, "revision": 1, "replay_id": "r-x", "cpc": 1.0}),
            orjson.dumps({"click_id": "a", "valid": True, "revision": 0}), b"junk",
            orjson.dumps({"click_id": "b", "valid": True, "revision": 0, "degraded": True})]
    got = latest_of(recs)
    assert got["a"] == Latest(1, False, False, "r-x", 1.0) and got["b"].degraded
    assert set(latest_of(recs, {"b"})) == {"b"}
    t = Tally()
    t.add(_d(False, 2.0), Latest(0, True, False, None))
    t.add(_d(True, 0.5), Latest(0, False, False, None))
    t.add(_d(True), Latest(0, True, True, None))
    j = t.to_json()
    assert (j["to_invalid"], j["to_valid"], j["resent"], j["credited"], j["rebilled"]) == (1, 1, 1, 2.0, 0.5)


def _rec(*clicks: tuple[int, int, str]) -> bytes:
    return orjson.dumps([{"c": {"click_id": cid}, "u": [0.0], "p": [p, o]} for p, o, cid in clicks])


def test_sequence_follows_the_live_order_and_keeps_the_window() -> None:
    # the replay user stage flushed partition 0's clicks before partition 1's; live interleaved them
    raw = {0: [_rec((0, 0, "a"), (0, 1, "b"), (FORWARDED + 1, 5, "f")), _rec((1, 0, "x"), (1, 1, "y"))],
           1: [_rec((0, 2, "c"))]}
    live = {0: [_rec((1, 0, "x"), (0, 0, "a")), _rec((0, 0, "a")), _rec((1, 1, "y"), (0, 1, "b"))],
            1: [_rec((0, 2, "c"))]}

    def keep(p: int, o: int) -> bool:
        return (p, o) != (0, 1)  # outside the window

    out, own = sequence(live, raw, keep, 2)
    ids = {p: [[r["c"]["click_id"] for r in orjson.loads(v)] for v in vs] for p, vs in out.items()}
    assert ids == {0: [["x", "a"], ["y"], ["f"]], 1: [["c"]]}  # live order, copies once, "f" not in live: last
    assert own == 1


def test_warmup_goes_back_a_day_before_the_earlier_of_event_and_record_time() -> None:
    asked: list[int] = []

    def times(ms: int) -> dict[int, int]:
        asked.append(ms)
        return {0: 3, 1: 40, 2: 7}

    got = warmup_start({0: (100_000_000, 90_000_000, 10), 1: (100_000_000, 100_000_000, 20)}, {0: 5, 1: 0, 2: 0},
                       times, 3)
    assert got == {0: 5, 1: 20, 2: 7}  # never before the log's beginning, never after the range's start
    assert asked == [90_000_000 - 86_400_000 - 7_200_000]


def test_the_user_stage_reads_as_far_as_the_live_ip_stage_had_before_the_last_range_click() -> None:
    live = {0: [_rec((1, 9, "b"), (0, 5, "a")), _rec((0, 6, "c"), (1, 12, "d"))],  # after the last: not needed
            1: [_rec((0, 20, "f"), (1, 3, "e"))]}

    def in_range(p: int, o: int) -> bool:
        return (p == 0 and o < 6) or (p == 1 and o < 4)

    assert needed(live, in_range, {0: 6, 1: 4}) == {0: 21, 1: 10}
