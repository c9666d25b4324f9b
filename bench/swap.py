"""Hot swap latency: time from a promote (or rollback) in the registry to the first decision by the new version.

A worker scores a steady stream of clicks (``rate``/s) with toy model A; the bench then alternates ``swaps`` times
between promoting toy model B and rolling back to A (``models.registry``), and for each switch reads the decisions
topic until the first decision made by the new version (its ``decided_at`` minus the switch time, wall clock on
this machine). ``slidr bench swap [--set swaps=6 --set rate=1000]``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import orjson

from bench.e2e import bench_topics, keyed, produce, running_worker


async def _first_by(s: Any, topic: str, version: str, after_ms: int, timeout_s: float) -> int | None:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **s.kafka_client_kwargs())
    await c.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(s.partitions)]
        c.assign(tps)
        offs = await c.offsets_for_times(dict.fromkeys(tps, after_ms))
        for tp in tps:
            o = offs.get(tp)
            c.seek(tp, o.offset) if o is not None else await c.seek_to_end(tp)
        t_end = time.monotonic() + timeout_s
        while time.monotonic() < t_end:
            for msgs in (await c.getmany(timeout_ms=200)).values():
                for m in msgs:
                    d = orjson.loads(m.value)
                    if d["model_version"] == version and d["decided_at"] >= after_ms:
                        return int(d["decided_at"])
        return None
    finally:
        await c.stop()


def run(swaps: int = 6, rate: float = 1000.0, timeout_s: float = 60.0, **opts: Any) -> dict[str, Any]:
    from models import registry
    from stream import toymodel
    from stream.synth import traffic

    out: list[float] = []
    with bench_topics("swap") as (s, t, tmp), running_worker(s, tmp):  # toy-bench, ACTIVE and STABLE
        b = toymodel.build(tmp / "b", version="toy-bench-b", threshold=0.3)
        clicks = [c.model_copy(update={"click_id": f"W{c.click_id}"}) for c in
                  traffic(int(rate * (20 + swaps * 8)), seed=13)]
        stop = threading.Event()

        def feed() -> None:
            for i in range(0, len(clicks), int(rate)):
                if stop.is_set():
                    return
                asyncio.run(produce(s, t.clicks, keyed(clicks[i:i + int(rate)]), rate=rate))

        th = threading.Thread(target=feed, daemon=True)
        th.start()
        try:
            asyncio.run(_first_by(s, t.decisions, "toy-bench", 0, timeout_s))  # the worker is up and scoring
            for i in range(swaps):
                at = int(time.time() * 1000)
                if i % 2 == 0:
                    registry.publish(b, s)
                    want = "toy-bench-b"
                else:
                    registry.rollback(s)
                    want = "toy-bench"
                first = asyncio.run(_first_by(s, t.decisions, want, at, timeout_s))
                out.append(float("nan") if first is None else (first - at) / 1000.0)
                time.sleep(2.0)
        finally:
            stop.set()
            th.join(60)
    a = np.asarray(out)
    return {"swaps": swaps, "rate": rate, "seconds_to_first_decision": [round(x, 3) for x in out],
            "median_s": round(float(np.nanmedian(a)), 3), "max_s": round(float(np.nanmax(a)), 3),
            "model_poll_s": s.model_poll_s}
