"""The event-time guard (issue 16, item 1), through both stages in the test process (tests/stream/stage_harness.py)."""

from __future__ import annotations

from pathlib import Path

from schemas.events import Click
from stream import features as F
from stream.stages import read_feature_log
from tests.stream.helpers import T0, click
from tests.stream.stage_harness import Harness

Y2099 = 4_070_908_800_000  # 2099-01-01, inside the schema's bounds (up to 2100)


def _features(h: Harness) -> dict[str, list[float]]:
    return {r["click_id"]: r["features"] for t, _, v, _ in h.out if t == h.t.feature_log and v
            for r in read_feature_log(v)}


def _ip_run(folder: Path, extra: list[Click]) -> Harness:
    h = Harness(folder, sweep_keys_per_click=5.0)
    bystanders = [click(10_000 + i, T0 + i, ip=f"10.9.{i // 200}.{i % 200}", session=f"b{i}") for i in range(1000)]
    h.feed(bystanders)
    first = [click(0, T0 + 2_000, ip="198.51.100.7", session="x0")]
    rest = [click(i, T0 + 2_000 + 1000 * i, ip="198.51.100.7", session=f"x{i % 5}") for i in range(1, 101)]
    h.feed(first + extra)
    for i in range(0, 100, 10):
        h.feed(rest[i:i + 10])
    return h


def test_a_far_future_click_is_dead_lettered_and_changes_nothing(tmp_path: Path) -> None:
    bad = click(999, Y2099, ip="198.51.100.7", session="x9")
    with_bad = _ip_run(tmp_path / "a", [bad])
    without = _ip_run(tmp_path / "b", [])
    dl = with_bad.dead_letters()
    assert [d["field"] for d in dl] == ["ts"] and "ahead of the worker's clock" in dl[0]["error"]
    assert "c999" not in with_bad.decisions()
    got, want = _features(with_bad), _features(without)
    assert got == want  # every click's features equal a run without the 2099 click
    col = F.FEATURE_NAMES.index("ip_clicks_1h")
    assert got["c100"][col] == 101.0  # (on the landed main: 1.0, the counters blinded by the 2099 click)
    assert with_bad.state("ips", "198.51.100.7") == without.state("ips", "198.51.100.7")
    # no key was swept away: the partition clocks never saw 2099
    assert with_bad.keys("users") == without.keys("users") == 1000 + 5  # the bystanders and sessions x0..x4
    assert with_bad.keys("ips") == without.keys("ips")


def test_too_late_clicks_are_dead_lettered_and_late_ones_in_the_window_count(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    now = T0 + 3 * F.DAY_MS
    h.feed([click(1, now, ip="192.0.2.1", session="a")])
    late = click(2, now - 2 * F.HOUR_MS, ip="192.0.2.1", session="a")  # late, inside the 24 h window
    too_late = click(3, now - F.DAY_MS - 2 * F.HOUR_MS, ip="192.0.2.1", session="b")  # 26 h behind
    h.feed([late, too_late])
    dl = h.dead_letters()
    assert len(dl) == 1 and dl[0]["field"] == "ts" and "behind its partition" in dl[0]["error"]
    assert set(h.decisions()) == {"c1", "c2"}
    st = h.state("users", "s:a")
    assert st is not None and sum(c for _, c in st["h"]) == 2  # the late click counted, in its own bucket
