"""Click-to-decision latency at a steady rate: p50 / p99 / p99.9.

The rate is ``fraction`` (0.5) of the worker's maximum, measured first in the same run as bench e2e measures it
(a backlog of ``max_n`` clicks on fresh topics, a fresh worker: ``max_clicks_per_s``), or ``rate`` clicks/s
when given. A worker is started and warmed up; clicks are then produced at that rate for ``seconds``. Latency
per click is the decision message's CreateTime (set by the worker's producer) minus the click message's
CreateTime (set by our producer when sent), both wall clock on this machine. If the worker cannot keep up with
the rate the latency grows with the backlog: ``achieved_decisions_per_s`` says so. A tail of unmeasured clicks
follows at the same rate for ``watermark_idle_s`` + 1 s, so that the measured ones see a steady stream.

Where the time goes (issue 21): ``user_stage_*`` is click sent -> the CreateTime of the by-ip record that carries
it (the clicks hop, the user stage's batch window and its batch), ``ip_stage_*`` that record -> the decision (the
by-ip hop, the IP stage's window, the watermark's hold, its batch). From the worker's own /metrics over the paced
run: batches per stage, events per batch, mean batch wall time (outputs handed over and acknowledged), scoring
calls; and the worker's CPU per click at this rate (``worker_cpu_us_per_click_paced``; compare bench e2e's, on a
backlog: small batches cost more per click).
``slidr bench latency [--set fraction=0.5 | --set rate=2000]``.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from typing import Any

import numpy as np
import orjson

from bench.e2e import (
    bench_topics,
    consume_count,
    free_port,
    keyed,
    max_throughput,
    process_cpu_s,
    produce,
    running_worker,
)


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


def _scrape(port: int) -> dict[tuple[str, str], float]:
    """(sample name, stage label) -> value of the worker's batch and scoring histograms' sums and counts."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name in ("slidr_batch_events", "slidr_batch_seconds", "slidr_scoring_seconds"):
            for smp in fam.samples:
                if smp.name.endswith(("_sum", "_count")):
                    out[(smp.name, smp.labels.get("stage", ""))] = smp.value
    return out


def stage_figures(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]) -> dict[str, Any]:
    """Per stage: batches, events per batch, mean batch ms over the run (differences of two scrapes)."""
    def d(name: str, stage: str = "") -> float:
        return after.get((name, stage), 0.0) - before.get((name, stage), 0.0)

    out: dict[str, Any] = {}
    for st in ("user", "ip"):
        n = d("slidr_batch_events_count", st)
        out[f"{st}_batches"] = round(n)
        out[f"{st}_events_per_batch"] = round(d("slidr_batch_events_sum", st) / n, 1) if n else None
        out[f"{st}_batch_ms_mean"] = round(1e3 * d("slidr_batch_seconds_sum", st) / n, 2) if n else None
    n = d("slidr_scoring_seconds_count")
    out["scoring_calls"] = round(n)
    out["scoring_ms_mean"] = round(1e3 * d("slidr_scoring_seconds_sum") / n, 3) if n else None
    return out


async def _read_topic(s: Any, topic: str, timeout_s: float) -> list[Any]:
    """The messages of ``topic`` (``s.partitions`` partitions) up to its end offsets now, or what came within
    ``timeout_s``."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **s.kafka_client_kwargs())
    await c.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(s.partitions)]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        ends = await c.end_offsets(tps)
        got = dict.fromkeys(tps, 0)
        out: list[Any] = []
        t_end = time.monotonic() + timeout_s
        while any(got[tp] < ends[tp] for tp in tps) and time.monotonic() < t_end:
            for tp, msgs in (await c.getmany(timeout_ms=500, max_records=20_000)).items():
                out.extend(msgs)
                got[tp] += len(msgs)
        return out
    finally:
        await c.stop()


def forwarded_at(records: list[Any]) -> dict[bytes, int]:
    """Click id -> CreateTime (ms) of the first by-ip record that carries it."""
    out: dict[bytes, int] = {}
    for m in records:
        for rec in orjson.loads(m.value):
            c = rec.get("c")
            if c is not None:
                out.setdefault(c["click_id"].encode(), m.timestamp)
    return out


def _pct(x: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(x, q)), 1) if len(x) else None


def run(rate: float | None = None, fraction: float = 0.5, seconds: float = 10.0, max_n: int = 50_000,
        timeout_s: float = 300.0, **opts: Any) -> dict[str, Any]:
    from stream.synth import traffic

    probe: dict[str, Any] = {}
    if rate is None:
        probe = max_throughput(int(max_n), timeout_s)
        rate = max(1.0, float(fraction) * probe["max_clicks_per_s"])
    rate = float(rate)
    n = int(rate * seconds)
    with bench_topics("lat") as (s, t, tmp):
        s = s.model_copy(update={"metrics_port": free_port()})  # the worker's /metrics: its batches
        with running_worker(s, tmp) as w:
            warm = traffic(500, seed=99)
            asyncio.run(produce(s, t.clicks, keyed(warm)))
            asyncio.run(consume_count(s, t.decisions, len(warm), timeout_s))  # worker up and warm
            # the measured clicks, then a tail at the same rate, unmeasured: a stream that stops leaves its last
            # clicks held for the watermark until their inputs count as idle (watermark_idle_s), which a steady
            # stream never does
            tail = int(rate * (s.watermark_idle_s + 1.0))
            clicks = [c.model_copy(update={"click_id": f"L{c.click_id}"}) for c in traffic(n + tail, seed=5)]
            m0, c0 = _scrape(s.metrics_port), process_cpu_s(w.pid)
            sent = asyncio.run(_send_timed(s, t.clicks, clicks, rate))
            msgs = asyncio.run(consume_count(s, t.decisions, n + tail + len(warm), timeout_s))
            m1, c1 = _scrape(s.metrics_port), process_cpu_s(w.pid)
            measured = {c.click_id.encode() for c in clicks[:n]}
        fwd = forwarded_at(asyncio.run(_read_topic(s, f"{t.prefix}.by-ip", timeout_s)))
    first: dict[bytes, int] = {}
    for m in msgs:
        if m.key in measured and m.key not in first:
            first[m.key] = m.timestamp
    lat = np.asarray([first[k] - sent[k] for k in first], dtype=np.float64)
    hop = [k for k in first if k in fwd]
    user = np.asarray([fwd[k] - sent[k] for k in hop], dtype=np.float64)
    ip = np.asarray([first[k] - fwd[k] for k in hop], dtype=np.float64)
    span = (max(first.values()) - min(sent[k] for k in first)) / 1000.0 if first else float("nan")
    cpu = None if c0 is None or c1 is None else round(1e6 * (c1 - c0) / (n + tail), 1)  # (the tail's clicks too)
    return {**probe, "fraction_of_max": float(fraction) if probe else None, "target_rate": round(rate),
            "clicks": n, "decided": len(first),
            "achieved_decisions_per_s": round(len(first) / span) if first else 0,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
            "p99_9_ms": float(np.percentile(lat, 99.9)) if len(lat) else None,
            "max_ms": float(lat.max()) if len(lat) else None,
            "user_stage_p50_ms": _pct(user, 50), "user_stage_p99_ms": _pct(user, 99),
            "ip_stage_p50_ms": _pct(ip, 50), "ip_stage_p99_ms": _pct(ip, 99),
            **stage_figures(m0, m1), "worker_cpu_us_per_click_paced": cpu}
