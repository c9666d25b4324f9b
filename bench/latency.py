"""Click-to-decision latency at a steady rate: p50 / p99 / p99.9.

The rate is ``fraction`` (0.5) of the worker's maximum, measured first in the same run as bench e2e measures it
(a backlog of ``max_n`` clicks on fresh topics, a fresh worker: ``max_clicks_per_s``), or ``rate`` clicks/s
when given. A worker is started and warmed up; clicks are then produced at that rate for ``seconds``. Latency
per click is the decision message's CreateTime (set by the worker's producer) minus the click message's
CreateTime (set by our producer when sent), both wall clock on this machine. If the worker cannot keep up with
the rate the latency grows with the backlog: ``achieved_decisions_per_s`` says so.
``slidr bench latency [--set fraction=0.5 | --set rate=2000]``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from bench.e2e import bench_topics, consume_count, keyed, max_throughput, produce, running_worker


async def _send_timed(s: Any, topic: str, clicks: list[Any], rate: float) -> dict[bytes, int]:
    """Paced send; return click id -> CreateTime (ms) of its message."""
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(linger_ms=1, **s.kafka_client_kwargs())
    await p.start()
    sent: dict[bytes, int] = {}
    t0 = time.perf_counter()
    try:
        futs = []
        for i, c in enumerate(clicks):
            if i % 25 == 0:
                ahead = t0 + i / rate - time.perf_counter()
                if ahead > 0:
                    await asyncio.sleep(ahead)
            now = int(time.time() * 1000)
            sent[c.click_id.encode()] = now
            futs.append(await p.send(topic, key=c.user_key.encode(), value=c.to_json(), timestamp_ms=now))
        await asyncio.gather(*futs)
    finally:
        await p.stop()
    return sent


def run(rate: float | None = None, fraction: float = 0.5, seconds: float = 10.0, max_n: int = 50_000,
        timeout_s: float = 300.0, **opts: Any) -> dict[str, Any]:
    from stream.synth import traffic

    probe: dict[str, Any] = {}
    if rate is None:
        probe = max_throughput(int(max_n), timeout_s)
        rate = max(1.0, float(fraction) * probe["max_clicks_per_s"])
    rate = float(rate)
    n = int(rate * seconds)
    with bench_topics("lat") as (s, t, tmp), running_worker(s, tmp):
        warm = traffic(500, seed=99)
        asyncio.run(produce(s, t.clicks, keyed(warm)))
        asyncio.run(consume_count(s, t.decisions, len(warm), timeout_s))  # worker up and warm
        clicks = [c.model_copy(update={"click_id": f"L{c.click_id}"}) for c in traffic(n, seed=5)]
        sent = asyncio.run(_send_timed(s, t.clicks, clicks, rate))
        msgs = asyncio.run(consume_count(s, t.decisions, n + len(warm), timeout_s))
    first: dict[bytes, int] = {}
    for m in msgs:
        if m.key in sent and m.key not in first:
            first[m.key] = m.timestamp
    lat = np.asarray([first[k] - sent[k] for k in first], dtype=np.float64)
    span = (max(first.values()) - min(sent.values())) / 1000.0 if first else float("nan")
    return {**probe, "fraction_of_max": float(fraction) if probe else None, "target_rate": round(rate),
            "clicks": n, "decided": len(first),
            "achieved_decisions_per_s": round(len(first) / span) if first else 0,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
            "p99_9_ms": float(np.percentile(lat, 99.9)) if len(lat) else None,
            "max_ms": float(lat.max()) if len(lat) else None}
