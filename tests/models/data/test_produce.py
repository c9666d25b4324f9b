"""``slidr produce`` against the real local broker: every record arrives once, byte-equal, resumably."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from models.data import produce as produce_mod
from models.data.produce import ProduceResult, checkpoint_path, merged_records, produce, write_checkpoint
from models.data.simulate import simulate
from tests.conftest import KEnv

pytestmark = pytest.mark.integration


async def _consume_all(env: KEnv, topic: str) -> dict[int, list[tuple[bytes, bytes]]]:
    """Every (key, value) on the topic, per partition in offset order."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    s = env.settings
    consumer = AIOKafkaConsumer(**s.kafka_client_kwargs(), group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(s.partitions)]  # as kenv created them
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        end = await consumer.end_offsets(parts)
        out: dict[int, list[tuple[bytes, bytes]]] = {tp.partition: [] for tp in parts}
        while [tp for tp in parts if await consumer.position(tp) < end[tp]]:
            batch = await consumer.getmany(timeout_ms=1000)
            for tp, msgs in batch.items():
                out[tp.partition].extend((m.key or b"", m.value or b"") for m in msgs)
        return out
    finally:
        await consumer.stop()


def _check_delivery(data: Path, env: KEnv) -> None:
    recs = list(merged_records(data))
    for topic, is_click in ((env.topics.clicks, True), (env.topics.purchases, False)):
        got = asyncio.run(_consume_all(env, topic))
        sent = [(r.key, r.value) for r in recs if r.is_click == is_click]
        flat = [kv for msgs in got.values() for kv in msgs]
        assert len(flat) == len(sent)  # none lost, none twice
        assert sorted(flat) == sorted(sent)  # byte-equal keys and values
        pos = {kv: i for i, kv in enumerate(sent)}
        for msgs in got.values():  # each partition keeps the file's (event-time) order
            idx = [pos[kv] for kv in msgs]
            assert idx == sorted(idx)


@pytest.fixture(scope="module")
def day(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return simulate("small", 3).write(tmp_path_factory.mktemp("day"))


def test_produce_a_day_and_consume_it_back(day: Path, kenv: KEnv) -> None:
    res = asyncio.run(produce(day, settings=kenv.settings, prefix=kenv.prefix))
    recs = list(merged_records(day))
    assert not res.interrupted and res.acked_total == len(recs)
    assert res.clicks == sum(r.is_click for r in recs) > 25_000 and res.purchases > 300
    _check_delivery(day, kenv)
    again = asyncio.run(produce(day, settings=kenv.settings, prefix=kenv.prefix))  # finished: nothing more
    assert again.clicks == again.purchases == 0
    _check_delivery(day, kenv)


def test_stop_and_resume_delivers_every_record(day: Path, kenv: KEnv, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "copy"
    data.mkdir()
    for f in day.iterdir():
        if f.is_file() and not f.name.startswith("."):
            (data / f.name).write_bytes(f.read_bytes())
    total = len(list(merged_records(data)))
    batch, stop_at = 500, 1000  # stop once two batches are acknowledged (an event, not a length of wall time)
    stop = asyncio.Event()
    seen: list[int] = []

    def checkpointed(d: Path, prefix: str, fp: dict[str, Any], acked: int, done: bool) -> None:
        write_checkpoint(d, prefix, fp, acked, done)  # the real one: the resume reads it
        seen.append(acked)
        if acked >= stop_at:
            stop.set()

    monkeypatch.setattr(produce_mod, "write_checkpoint", checkpointed)

    async def stopped_midway() -> ProduceResult:
        return await produce(data, settings=kenv.settings, prefix=kenv.prefix, rate=10_000, batch=batch, stop=stop)

    first = asyncio.run(stopped_midway())
    # a graceful stop ends after the batch in flight is acknowledged and checkpointed
    assert seen == [batch, stop_at] and stop_at < total
    assert first.interrupted and first.acked_total == stop_at and first.clicks + first.purchases == stop_at
    ck = orjson.loads(checkpoint_path(data, kenv.prefix).read_bytes())
    assert ck["acked"] == stop_at and not ck["done"]

    monkeypatch.undo()
    res = asyncio.run(produce(data, settings=kenv.settings, prefix=kenv.prefix))
    assert not res.interrupted and res.acked_total == total
    assert res.clicks + res.purchases == total - stop_at  # resumed where it stopped: nothing sent twice
    assert orjson.loads(checkpoint_path(data, kenv.prefix).read_bytes())["done"]
    _check_delivery(data, kenv)  # every record on the topics exactly once, byte-equal, in order per partition
