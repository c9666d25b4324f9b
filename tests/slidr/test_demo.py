"""The demo's pure parts: splitting the stream window and summarising decisions (no Kafka here)."""

from __future__ import annotations

from pathlib import Path

from models.data.dataset import load_dataset
from models.data.simulate import simulate_to
from schemas import Decision
from slidr.demo import summarize, window_dataset


def test_window_split_and_summary(tmp_path: Path) -> None:
    simulate_to(tmp_path / "data", "small", 3)
    info = window_dataset(tmp_path / "data", tmp_path / "stream", hours=1, warmup_hours=4)
    live, warm = load_dataset(tmp_path / "stream" / "live"), load_dataset(tmp_path / "stream" / "warmup")
    assert (len(live.clicks), len(warm.clicks)) == (info["live"], info["warmup"])
    assert max(c.ts for c in warm.clicks) < info["live_start_ms"] <= min(c.ts for c in live.clicks)
    assert max(c.ts for c in live.clicks) < info["end_ms"]
    assert live.truth is not None and set(live.truth) == {c.click_id for c in live.clicks}

    # invalidate exactly the true bots of the live hour: recall 1, no human invalidated, FPR 0
    decisions = {
        c.click_id: Decision(click_id=c.click_id, valid=not live.truth[c.click_id][0], score=0.5, threshold=0.5,
                             slice=c.slice, model_version="m", decided_at=c.ts, event_ts=c.ts,
                             advertiser_id=c.advertiser_id)
        for c in live.clicks[:-10]  # the last 10 clicks stay undecided
    }
    r = summarize(tmp_path / "stream" / "live", decisions, {k: 7 for k in decisions}, coverage_k=30)
    assert r["clicks"] == len(live.clicks) and r["decided"] == len(live.clicks) - 10
    bots_decided = sum(live.truth[k][0] for k in decisions)
    bots = sum(b for b, _ in live.truth.values())
    assert r["true_bot_recall"] == bots_decided / bots
    assert r["true_human_false_invalidation"] == 0.0
    assert r["overall"]["fpr"] <= 0.05  # purchases are (almost) all human; accidents are rare
    assert r["latency_ms"]["p50"] == 7.0
    assert set(r["slices"]) <= {"desktop:in", "desktop:out", "mobile:in", "mobile:out", "app:in", "app:out"}
