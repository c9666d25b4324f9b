"""Bounded state under key churn (issue 16, item 3), through both stages in the test process."""

from __future__ import annotations

from pathlib import Path

from stream import features as F
from stream import stages
from tests.stream.helpers import T0, click
from tests.stream.stage_harness import Harness

EVERY_MS = 20_000  # one click every 20 s of event time, each a new one-click session
PER_DAY = F.DAY_MS // EVERY_MS


def _churn(h: Harness, days: int) -> list[tuple[int, int, int]]:
    """Feed ``days`` of one-click sessions; return (day, users keys held, keys alive in the last TTL + grace)."""
    alive = (F.TTL_MS + F.EXPIRY_GRACE_MS) // EVERY_MS
    out = []
    n = days * PER_DAY
    for start in range(0, n, 500):
        h.feed([click(i, T0 + i * EVERY_MS, ip=f"10.{i % 3}.0.{i % 50}", session=f"one{i}")
                for i in range(start, min(n, start + 500))])
        end = min(n, start + 500)
        if end % PER_DAY < 500 and end >= 2 * PER_DAY:  # about the end of a day, from day 2 on
            out.append((end // PER_DAY, h.keys("users"), alive))
    return out


def test_keys_stay_bounded_when_every_click_is_a_new_key(tmp_path: Path) -> None:
    """5 days of clicks that each bring a new user key: the table holds under 2x the keys alive in the last
    25 h (on the landed main, with 0.25 keys swept per click, it grew without end: about 1 key per click)."""
    h = Harness(tmp_path)
    seen = _churn(h, 5)
    print("day, users keys held, keys alive in the last 25 h:", seen)
    assert len(seen) >= 3
    for _day, held, alive in seen:
        assert held < 2 * alive, seen
    assert seen[-1][1] <= seen[0][1] * 1.2  # flat, not growing


def test_a_partition_over_its_key_bound_evicts_idle_keys_early(tmp_path: Path) -> None:
    h = Harness(tmp_path, max_keys_per_partition=400)
    seen = _churn(h, 3)
    hour_keys = stages.EVICT_IDLE_MS // EVERY_MS  # keys a partition would keep at most if evicted at 1 h idle
    assert h.users.writer.evicted > 0
    for p, n in h.users.writer.count.items():
        assert n <= 400 + hour_keys, (p, n, seen)
    for p, n in h.users.writer.count.items():  # the writer's count is the store's
        assert n == sum(1 for k in h.user_dbs[p].keys() if not k.startswith(b"__faust")), p  # noqa: SIM118
