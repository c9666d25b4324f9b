"""Soak: one worker under a steady load for ``minutes`` (10) at ``rate`` clicks/s; do lag, memory, latency stay flat?

Rate: ``--set rate=N``, or else half of the maximum measured first by a short probe with bench/e2e.py's machinery
(``max_n`` clicks, 100,000 by default, pre-loaded as a backlog into fresh topics; a fresh worker drains them;
decided clicks / first-to-last decision span). The soak itself uses other fresh topics and a fresh worker (toy
model), warmed up with 500 clicks; then clicks are produced at ``rate`` for ``minutes``: the clicks of
``stream.synth.traffic`` (300 users, 60 IPs: a fixed key set with bounded per-key windows) repeated
with unique click ids (``soak<seq>``) and event times shifted forward on every repetition, each message's
CreateTime stamped at send (as bench/latency.py does). Event time advances by traffic's ~50 ms per click, i.e.
``rate / 20`` times wall time: the per-key 24 h windows are full after 24 h of event time (11.5 minutes at 2,500
clicks/s), so at low rates the per-key state still fills during the run (a few hundred keys: small). Every
``sample_s`` seconds (5) we sample:

- ``decision_lag``: clicks sent so far minus distinct clicks decided so far (a concurrent consumer of the
  decisions topic);
- ``commit_lag``: end offsets of the clicks topic minus the offsets the worker's consumer group
  (``settings.worker_id``) committed there (a partition without a committed offset counts from its start);
  ``None`` while the group has committed nothing on the clicks topic;
- ``worker_rss_mib``: the worker process's VmRSS (``/proc/PID/status``; RocksDB memtables fill first);
- ``worker_cpu_pct``: its user + system CPU time over the interval, in % of one core;
- ``p99_latency_ms``: p99 over the clicks first decided in the interval of decision CreateTime minus click
  CreateTime (both wall clock here);
- ``decisions_per_s``: distinct clicks decided in the interval per second;
- ``rocksdb_mib``: RocksDB's own accounting of the worker's table stores (memtables, block caches, table readers;
  the worker's ``slidr_table_rocksdb_bytes`` gauges, read from its metrics endpoint, refreshed every 5 s) and
  ``rss_less_rocksdb_mib``, the rest of the RSS (Python's heap, onnxruntime, the clients): where RSS growth is.
  Their trends are reported under ``memory_split``, outside ``all_flat`` (RocksDB's part is bounded by the
  settings' memtable and cache sizes per store and may fill towards that bound).

Per metric we report the series, first / last / mean, and the least-squares slope per minute (``numpy.polyfit``,
degree 1) over the samples taken after the warm-up: the first minute (the first half of runs shorter than two
minutes) is left out of the fit. Flatness rule: ``rel_slope_per_min = slope_per_min / max(|mean|, floor)``
(mean over the fitted samples), and a metric stayed flat when ``|rel_slope_per_min| <= 0.02``, i.e. its fitted
line moves by at most 2% of its level per minute (18% over the 9 fitted minutes of the default run). The floor
keeps metrics whose level is near zero from turning noise into huge relative slopes: one second of clicks
(``rate``) for the lags, 10 ms for the latency, 5% of a core for the CPU, none (0) for memory and decisions/s.
Fewer than 3 fitted samples: no slope, ``flat`` is ``None``. ``slope_stderr_per_min`` (the slope's standard error
from the residuals) says how much of a slope is sampling noise: a short run's verdicts are weak. ``all_flat``:
every metric flat (``commit_lag`` left out while the group has committed nothing). Latency percentiles
``p50_ms`` / ``p99_ms`` / ``max_ms`` cover the clicks sent after the warm-up; ``p99_ms_all`` every click.

When production ends we wait (at most ``timeout_s``) until every sent click is decided: ``drain_s``,
``undecided``. Loopback broker only; everything is bounded in time (probe and warm-up by ``timeout_s``, the
producer by ``minutes * 60 + timeout_s``). ``slidr bench soak [--set rate=2000] [--set minutes=10]
[--set sample_s=5] [--set max_n=100000] [--set timeout_s=300] [--set probe=paced|backlog] [--set probe_s=90]``.

Event time: ``event_scale`` (20) stretches the pool's event-time spacing, so event time advances about
``rate / 20 * event_scale`` times wall time (1,530 s a second at 1,530 clicks/s) and every key's 24 h windows are
full within the first minute, which the fit leaves out: the soak measures a steady state. At ``event_scale=1``
a 10-minute soak at 1,531/s ended with the windows still filling (12.7 h of event time): the worker's cost per
click grew with its states, and p99 latency rose by 9% of its level a minute.

Probe ``paced`` (the default): the backlog maximum leaves out the paced producer and the sampler, which share
this machine's cores with the worker during the soak (half the backlog maximum, 2,994/s, was not sustainable
here: lag grew by 8.9k clicks a minute). So the backlog maximum is then offered by the soak machinery itself for
``probe_s`` (90 s) on fresh topics and a fresh worker, and the worker's mean decisions/s after the warm-up
(``max_paced_clicks_per_s``) is the maximum the soak runs at half of.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from bench.e2e import bench_topics, consume_count, free_port, keyed, max_throughput, produce, running_worker

FLAT_REL_PER_MIN = 0.02  # a flat metric's fitted line moves by at most 2% of its level per minute
WARMUP_S = 60.0  # left out of the slope fits (half the run when it is shorter than two minutes)
POOL_N = 20_000  # distinct traffic clicks, repeated with new ids and later event times
EVENT_SCALE = 20.0  # event time runs this many times the pool's spacing: per-key windows full within a minute
ID_PREFIX = b"soak"
_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


# ----------------------------------------------------------------------------------------------- pure helpers


def warmup_s(duration_s: float) -> float:
    """Seconds at the start of a run left out of the slope fits: one minute, or half of a shorter run."""
    return WARMUP_S if duration_s >= 2 * WARMUP_S else duration_s / 2


def trend(t_s: Sequence[float], values: Sequence[float | None], skip_s: float, floor: float = 0.0,
          max_rel_per_min: float = FLAT_REL_PER_MIN) -> dict[str, Any]:
    """Least-squares line through the samples at ``t >= skip_s`` (``None`` values left out) and the flatness
    verdict: ``|slope per minute| / max(|mean|, floor) <= max_rel_per_min``."""
    vals = [v for v in values if v is not None]
    out: dict[str, Any] = {"first": vals[0] if vals else None, "last": vals[-1] if vals else None,
                           "mean": None, "slope_per_min": None, "slope_stderr_per_min": None,
                           "rel_slope_per_min": None, "flat": None,
                           "fit_from_s": skip_s, "fit_points": 0}
    pts = [(t, v) for t, v in zip(t_s, values, strict=True) if v is not None and t >= skip_s]
    out["fit_points"] = len(pts)
    if len(pts) < 3:
        return out
    x = np.asarray([p[0] for p in pts], dtype=np.float64) / 60.0
    y = np.asarray([p[1] for p in pts], dtype=np.float64)
    slope, icept = (float(v) for v in np.polyfit(x, y, 1))
    resid = y - (slope * x + icept)
    sxx = float(((x - x.mean()) ** 2).sum())
    stderr = float(np.sqrt((resid**2).sum() / (len(x) - 2) / sxx)) if sxx > 0 and len(x) > 2 else float("nan")
    mean = float(y.mean())
    scale = max(abs(mean), floor)
    rel = slope / scale if scale > 0 else (0.0 if slope == 0 else float("inf") * np.sign(slope))
    out.update(mean=round(mean, 3), slope_per_min=round(slope, 4), slope_stderr_per_min=round(stderr, 4),
               rel_slope_per_min=round(rel, 5),
               flat=bool(abs(rel) <= max_rel_per_min))
    return out


def all_flat(metrics: dict[str, dict[str, Any]]) -> bool | None:
    """Every metric flat (``commit_lag`` left out while nothing is committed); None when a verdict is missing."""
    verdicts = [v["flat"] for k, v in metrics.items() if not (k == "commit_lag" and v["fit_points"] == 0)]
    return None if any(f is None for f in verdicts) else all(verdicts)


def commit_lag(end: dict[int, int], committed: dict[int, int], start: dict[int, int]) -> int | None:
    """Sum over partitions of end offset minus committed offset (from the partition's start when it has none);
    ``None`` when nothing is committed at all."""
    if not any(o >= 0 for o in committed.values()):
        return None
    total = 0
    for p, e in end.items():
        c = committed.get(p, -1)
        total += max(e - (c if c >= 0 else start.get(p, 0)), 0)
    return total


def seq_of(key: bytes | None) -> int | None:
    """The sequence number of a soak click id (``soak<seq>``), None for any other key."""
    if key is None or not key.startswith(ID_PREFIX):
        return None
    try:
        return int(key[len(ID_PREFIX):])
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------------ process probes


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def _rocksdb_mib(port: int) -> float | None:
    """The worker's RocksDB memory (its ``slidr_table_rocksdb_bytes`` gauges, every kind but ``sst_files``) in MiB;
    None when its metrics endpoint does not answer."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith("slidr_table_rocksdb_bytes{") and 'kind="sst_files"' not in line:
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    return total / 2**20 if seen else None


def _check_loopback(bootstrap: str) -> None:
    for b in bootstrap.split(","):
        host = b.strip().rsplit(":", 1)[0]
        if host not in _LOOPBACK:
            raise RuntimeError(f"bench soak runs against a loopback broker only, not {b.strip()!r}")


# ----------------------------------------------------------------------------------------------------- the probe


# ------------------------------------------------------------------------------------------------------ the soak


@dataclass
class _State:
    n: int
    sent_ms: np.ndarray
    decided: np.ndarray
    lat_ms: np.ndarray
    sent: int = 0
    n_decided: int = 0
    interval_lat: list[int] = field(default_factory=list)
    t0: float = 0.0  # perf_counter at the first send
    t0_ms: int = 0  # wall clock (ms) at the first send
    send_done: float = 0.0


async def _producer(s: Any, topic: str, pool: list[tuple[bytes, dict[str, Any]]], st: _State, rate: float,
                    ts_offset: int, cycle_ms: int, started: asyncio.Event, deadline_s: float) -> None:
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(linger_ms=1, **s.kafka_client_kwargs())
    await p.start()
    try:
        futs: list[Any] = []
        st.t0, st.t0_ms = time.perf_counter(), int(time.time() * 1000)
        started.set()
        for i in range(st.n):
            if i % 25 == 0:  # pace in small bursts, as bench/latency.py does
                now_p = time.perf_counter()
                if now_p - st.t0 > deadline_s:
                    break
                ahead = st.t0 + i / rate - now_p
                if ahead > 0:
                    await asyncio.sleep(ahead)
            if i % 5000 == 0 and futs:  # acks of the previous chunk (long done): bounded memory
                prev, futs = futs, []
                await asyncio.gather(*prev)
            key, base = pool[i % len(pool)]
            d = dict(base)
            d["click_id"] = f"soak{i}"
            d["ts"] = base["ts"] + ts_offset + (i // len(pool)) * cycle_ms
            now = int(time.time() * 1000)
            st.sent_ms[i] = now
            futs.append(await p.send(topic, key=key, value=orjson.dumps(d), timestamp_ms=now))
            st.sent = i + 1
        await asyncio.gather(*futs)
    finally:
        await p.stop()
        st.send_done = time.perf_counter()


async def _decisions(s: Any, topic: str, st: _State, stop: asyncio.Event) -> None:
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(topic, group_id=None, auto_offset_reset="earliest", **s.kafka_client_kwargs())
    await c.start()
    try:
        while not stop.is_set():
            for batch in (await c.getmany(timeout_ms=200, max_records=10_000)).values():
                for m in batch:
                    i = seq_of(m.key)
                    if i is None or i >= st.n or st.decided[i]:
                        continue
                    st.decided[i] = True
                    st.n_decided += 1
                    lat = int(m.timestamp - st.sent_ms[i])
                    st.lat_ms[i] = lat
                    st.interval_lat.append(lat)
    finally:
        await c.stop()


async def _sampler(s: Any, topic: str, nparts: int, worker: subprocess.Popen[bytes], st: _State,
                   duration_s: float, sample_s: float, started: asyncio.Event) -> dict[str, list[Any]]:
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    pid = worker.pid
    tps = [TopicPartition(topic, p) for p in range(nparts)]
    admin = AIOKafkaAdminClient(**s.kafka_client_kwargs())
    offs = AIOKafkaConsumer(group_id=None, **s.kafka_client_kwargs())
    await admin.start()
    await offs.start()
    series: dict[str, list[Any]] = {k: [] for k in ("t_s", "sent", "decided", "decision_lag", "commit_lag",
                                                     "worker_rss_mib", "worker_cpu_pct", "p99_latency_ms",
                                                     "decisions_per_s", "rocksdb_mib", "rss_less_rocksdb_mib")}
    try:
        start = {tp.partition: o for tp, o in (await offs.beginning_offsets(tps)).items()}
        await started.wait()
        prev_t, prev_cpu, prev_dec = st.t0, _cpu_s(pid), st.n_decided
        k = 1
        while k * sample_s <= duration_s + 1e-9:
            await asyncio.sleep(max(st.t0 + k * sample_s - time.perf_counter(), 0.0))
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited (rc {worker.returncode}) {k * sample_s:.0f} s into the soak")
            now, cpu, sent, dec = time.perf_counter(), _cpu_s(pid), st.sent, st.n_decided
            lat, st.interval_lat = st.interval_lat, []
            rss = _rss_mib(pid)
            end = {tp.partition: o for tp, o in (await offs.end_offsets(tps)).items()}
            committed = {tp.partition: om.offset
                         for tp, om in (await admin.list_consumer_group_offsets(s.worker_id, partitions=tps)).items()}
            dt = max(now - prev_t, 1e-6)
            series["t_s"].append(round(now - st.t0, 2))
            series["sent"].append(sent)
            series["decided"].append(dec)
            series["decision_lag"].append(sent - dec)
            series["commit_lag"].append(commit_lag(end, committed, start))
            series["worker_rss_mib"].append(round(rss, 1))
            series["worker_cpu_pct"].append(round(100.0 * (cpu - prev_cpu) / dt, 1))
            series["p99_latency_ms"].append(round(float(np.percentile(lat, 99)), 1) if lat else None)
            series["decisions_per_s"].append(round((dec - prev_dec) / dt, 1))
            rocks = await asyncio.to_thread(_rocksdb_mib, s.metrics_port) if s.metrics_port else None
            series["rocksdb_mib"].append(None if rocks is None else round(rocks, 1))
            series["rss_less_rocksdb_mib"].append(None if rocks is None else round(rss - rocks, 1))
            prev_t, prev_cpu, prev_dec = now, cpu, dec
            k += 1
    finally:
        await offs.stop()
        await admin.close()
    return series


async def _soak(s: Any, t: Any, worker: subprocess.Popen[bytes], rate: float, duration_s: float, sample_s: float,
                timeout_s: float, after_ts: int, skip_s: float, event_scale: float = 1.0) -> dict[str, Any]:
    from stream.synth import traffic

    base = traffic(POOL_N, seed=11)
    lo = min(c.ts for c in base)
    # event time runs ``event_scale`` times the pool's own spacing (see the module doc)
    pool = [(c.user_key.encode(), c.model_dump() | {"ts": lo + int((c.ts - lo) * event_scale)}) for c in base]
    hi = max(d["ts"] for _, d in pool)
    n = max(int(rate * duration_s), 1)
    st = _State(n=n, sent_ms=np.zeros(n, np.int64), decided=np.zeros(n, np.bool_), lat_ms=np.full(n, -1, np.int64))
    started, stop = asyncio.Event(), asyncio.Event()
    consumer = asyncio.create_task(_decisions(s, t.decisions, st, stop))
    sampler = asyncio.create_task(_sampler(s, t.clicks, s.partitions, worker, st, duration_s, sample_s, started))
    producer: asyncio.Task[None] | None = None
    try:
        await asyncio.sleep(1.0)  # the decisions consumer is assigned and positioned before the first send
        producer = asyncio.create_task(_producer(s, t.clicks, pool, st, rate, after_ts + 1000 - lo, hi - lo + 100,
                                                 started, duration_s + timeout_s))
        # a failing sampler (the worker exited) or consumer ends the run at once
        while not producer.done():
            watched = {producer} | {x for x in (sampler, consumer) if not x.done()}
            await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            for x in (sampler, consumer):
                if x.done():
                    x.result()  # raises what ended it
        await producer
        series = await asyncio.wait_for(sampler, timeout=timeout_s + sample_s)
        while st.n_decided < st.sent and time.perf_counter() - st.send_done < timeout_s:
            if consumer.done():
                consumer.result()
            await asyncio.sleep(0.05)
        drain_s = time.perf_counter() - st.send_done
    finally:
        stop.set()
        for pending in (producer, sampler):
            if pending is not None and not pending.done():
                pending.cancel()
        await asyncio.gather(*(x for x in (producer, sampler, consumer) if x is not None), return_exceptions=True)
    ok = st.decided[: st.sent]
    lat = st.lat_ms[: st.sent][ok].astype(np.float64)
    after = (st.sent_ms[: st.sent][ok] >= st.t0_ms + 1000 * skip_s)
    return {"series": series, "sent": st.sent, "decided": st.n_decided, "sent_s": st.send_done - st.t0,
            "drain_s": drain_s, "lat": lat, "lat_after": lat[after]}


def _run_soak(rate: float, duration_s: float, sample_s: float, timeout_s: float, skip: float,
              event_scale: float = 1.0) -> dict[str, Any]:
    """One soak: fresh topics and worker, 500 warm-up clicks, then ``rate`` clicks/s for ``duration_s``."""
    from stream.synth import traffic

    with bench_topics("soak") as (s0, t, tmp):
        s = s0.model_copy(update={"metrics_port": free_port()})  # its RocksDB gauges split the RSS
        with running_worker(s, tmp) as w:
            warm = traffic(500, seed=99)
            asyncio.run(produce(s, t.clicks, keyed(warm)))
            if len({m.key for m in asyncio.run(consume_count(s, t.decisions, len(warm), timeout_s))}) < len(warm):
                raise RuntimeError(f"the worker did not decide the {len(warm)} warm-up clicks in {timeout_s} s")
            res = asyncio.run(asyncio.wait_for(
                _soak(s, t, w, rate, duration_s, sample_s, timeout_s, max(c.ts for c in warm), skip, event_scale),
                timeout=duration_s + 3 * timeout_s + 60))
            res["partitions"] = s.partitions
    return res


def run(rate: float | None = None, minutes: float = 10.0, sample_s: float = 5.0, max_n: int = 100_000,
        timeout_s: float = 300.0, **opts: Any) -> dict[str, Any]:
    from slidr.settings import Settings

    if minutes <= 0 or sample_s <= 0 or max_n <= 0 or timeout_s <= 0 or (rate is not None and rate <= 0):
        raise ValueError("rate, minutes, sample_s, max_n and timeout_s must be positive")
    _check_loopback(Settings().kafka_bootstrap)
    out: dict[str, Any] = {}
    scale = float(opts.get("event_scale", EVENT_SCALE))
    out["event_scale"] = scale
    if rate is None:
        out.update(max_throughput(int(max_n), timeout_s))
        rate = out["max_clicks_per_s"] / 2.0
        out["rate_source"] = "half the measured maximum (backlog)"
        if str(opts.get("probe", "paced")) == "paced":
            # the backlog maximum leaves out the paced producer and the sampler, which share the cores with the
            # worker during the soak: offer the backlog maximum for probe_s and take what the worker decided
            probe_s = float(opts.get("probe_s", 90.0))
            p = _run_soak(out["max_clicks_per_s"], probe_s, float(sample_s), timeout_s, warmup_s(probe_s), scale)
            fitted = [v for t_s, v in zip(p["series"]["t_s"], p["series"]["decisions_per_s"], strict=True)
                      if t_s >= warmup_s(probe_s) and v is not None]
            out["max_paced_clicks_per_s"] = round(float(np.mean(fitted)), 1) if fitted else None
            out["max_paced_probe_s"] = probe_s
            if fitted:
                rate = out["max_paced_clicks_per_s"] / 2.0
                out["rate_source"] = "half the measured maximum (paced: with the producer and sampler running)"
    else:
        out["rate_source"] = "given"
    rate = float(rate)
    duration_s = float(minutes) * 60.0
    skip = warmup_s(duration_s)
    res = _run_soak(rate, duration_s, float(sample_s), timeout_s, skip, scale)
    partitions = res["partitions"]
    series, lat, lat_all = res["series"], res["lat_after"], res["lat"]
    floors = {"decision_lag": rate, "commit_lag": rate, "worker_rss_mib": 0.0, "worker_cpu_pct": 5.0,
              "p99_latency_ms": 10.0, "decisions_per_s": 0.0}
    metrics = {m: trend(series["t_s"], series[m], skip, floor) for m, floor in floors.items()}
    memory_split = {m: trend(series["t_s"], series[m], skip) for m in ("rocksdb_mib", "rss_less_rocksdb_mib")}
    out.update({
        "rate": round(rate, 1), "minutes": minutes, "sample_s": sample_s, "partitions": partitions,
        "cpu_cores": os.cpu_count(), "clicks": int(rate * duration_s), "sent": res["sent"],
        "achieved_send_per_s": round(res["sent"] / max(res["sent_s"], 1e-6), 1),
        "decided": res["decided"], "undecided": res["sent"] - res["decided"], "drain_s": round(res["drain_s"], 2),
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "max_ms": float(lat.max()) if len(lat) else None,
        "p99_ms_all": float(np.percentile(lat_all, 99)) if len(lat_all) else None,
        "samples": len(series["t_s"]), "warmup_excluded_s": skip,
        "flat_rule": f"|slope_per_min| / max(|mean|, floor) <= {FLAT_REL_PER_MIN} over samples at t >= "
                     f"{skip:g} s; floors {floors}",
        "all_flat": all_flat(metrics),
        "flat": {k: v["flat"] for k, v in metrics.items()},
        "metrics": metrics, "memory_split": memory_split, "series": series,
    })
    return out
