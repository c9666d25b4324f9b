"""The demo's parts: splitting the stream window, summarising decisions, and (with Kafka) the lag-0 wait."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from models.data.dataset import load_dataset
from models.data.simulate import simulate_to
from schemas import Decision
from slidr.demo import group_lag, summarize, wait_caught_up, window_dataset
from stream.synth import traffic
from tests.conftest import KEnv


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


@pytest.mark.integration
def test_caught_up_means_the_group_committed_every_input(kenv: KEnv) -> None:
    """The live hour starts at lag 0: ``group_lag`` counts what the worker's group has not committed on its two
    inputs (clicks, by-ip); committing their ends brings it to 0 and ``wait_caught_up`` returns."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.structs import OffsetAndMetadata

    from stream.app import ensure_topics

    s, t = kenv.settings, kenv.topics
    asyncio.run(ensure_topics(s))
    clicks = traffic(30, seed=1)

    async def send() -> None:
        p = AIOKafkaProducer(**s.kafka_client_kwargs())
        await p.start()
        try:
            await asyncio.gather(*[await p.send(t.clicks, c.to_json(), key=c.user_key.encode()) for c in clicks])
            await p.send_and_wait(f"{t.prefix}.by-ip", b"[]", partition=0)
        finally:
            await p.stop()

    async def commit(upto: dict[TopicPartition, int]) -> None:
        c = AIOKafkaConsumer(group_id=s.worker_id, enable_auto_commit=False, **s.kafka_client_kwargs())
        await c.start()
        try:
            c.assign(list(upto))
            await c.commit({tp: OffsetAndMetadata(o, "") for tp, o in upto.items()})
        finally:
            await c.stop()

    async def ends() -> dict[TopicPartition, int]:
        c = AIOKafkaConsumer(group_id=None, **s.kafka_client_kwargs())
        await c.start()
        try:
            return dict(await c.end_offsets([TopicPartition(tp, p) for tp in (t.clicks, f"{t.prefix}.by-ip")
                                             for p in range(s.partitions)]))
        finally:
            await c.stop()

    asyncio.run(send())
    topics = [t.clicks, f"{t.prefix}.by-ip"]
    assert asyncio.run(group_lag(s, s.worker_id, topics)) == 31  # nothing committed yet
    end = asyncio.run(ends())
    first = next(tp for tp, o in end.items() if tp.topic == t.clicks and o > 0)
    asyncio.run(commit({**end, first: end[first] - 1}))
    assert asyncio.run(group_lag(s, s.worker_id, topics)) == 1
    with pytest.raises(RuntimeError, match="did not catch up"):
        wait_caught_up(s, 1.0)
    asyncio.run(commit(end))
    assert wait_caught_up(s, 30.0) < 30.0
