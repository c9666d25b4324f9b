"""Scale-out: the same clicks through 1, then 2 workers (one consumer group each run), clicks/s for each; then
through 1, then 2 processes of the Quix Streams peer (``bench/peer.py``, when it is installed), measured the
same way: the second figure issue 21 asks for (two workers against two peer processes on this machine's cores).

Each run gets its own topics (same partition count, same clicks): its workers are started first and waited for
until each one's health verdict passes (``stream/health.py``: broker, assigned partitions, model), so no
rebalance falls inside the measurement; then the clicks are produced at full speed and the rate is the decided
clicks over the span from the first decision to the last (producer timestamps of the decisions) once ``n`` are
decided, as ``slidr bench e2e`` measures one worker: the ``n`` clicks are followed by a tail
(``bench.e2e.backlog``), for a stream that stops holds its last clicks in the IP stage for
``watermark_idle_s``. Workers are processes here (one per core on a 2-core machine); in a cluster they are
pods (deploy/k8s), and the partition count bounds how many can share the work.
The peers are started, warmed up (500 clicks decided) and waited for until their consumer group is stable with
every process in it, then the clicks are produced as for the workers; a peer process runs until it is stopped.
``slidr bench scale [--set n=100000] [--set workers=[1,2]] [--set peers=[1,2]]`` (``peers=[]``: workers only).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.e2e import backlog, bench_topics, consume_count, free_port, keyed, produce, stop_worker, worker_env


def _start(env: dict[str, str], data_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "slidr", "worker", "--data-dir", str(data_dir),
                             "--loglevel", "warning"], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def one_run(workers: int, clicks: list[Any], n: int, timeout_s: float) -> dict[str, Any]:
    from stream import toymodel
    from stream.health import probe

    with bench_topics(f"scale{workers}") as (s, t, tmp):
        toymodel.build_registry(s.registry_path, version="toy-bench")
        ports = [free_port() for _ in range(workers)]
        procs = [_start({**worker_env(s), "SLIDR_METRICS_PORT": str(p)}, tmp / f"w{i}", tmp / f"w{i}.log")
                 for i, p in enumerate(ports)]
        try:
            t_end = time.monotonic() + timeout_s
            while not all(probe(f"http://127.0.0.1:{p}/metrics")[0] for p in ports):
                for i, w in enumerate(procs):
                    if w.poll() is not None:
                        raise RuntimeError(f"worker {i} exited: {(tmp / f'w{i}.log').read_text()[-2000:]}")
                if time.monotonic() > t_end:
                    raise RuntimeError("the workers did not all become healthy (assigned) in time")
                time.sleep(0.5)
            asyncio.run(produce(s, t.clicks, keyed(clicks)))
            msgs = asyncio.run(consume_count(s, t.decisions, n, timeout_s))
        finally:
            for w in procs:
                stop_worker(w)
        decided = len({m.key for m in msgs})
        ts = sorted(m.timestamp for m in msgs)
        span_s = max((ts[-1] - ts[0]) / 1000.0, 1e-3) if ts else float("nan")
        return {"workers": workers, "partitions": s.partitions, "decided": decided,
                "first_to_last_decision_s": round(span_s, 2), "clicks_per_s": round(decided / span_s)}


async def _group(s: Any, group: str) -> tuple[str, int]:
    """(state, members) of a consumer group (the admin API's DescribeGroups)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**s.kafka_client_kwargs())
    await admin.start()
    try:
        resp = await admin.describe_consumer_groups([group])
        groups = [g for r in resp for g in r.groups]
        return (str(groups[0][2]), len(groups[0][5])) if groups else ("", 0)
    finally:
        await admin.close()


def peer_run(count: int, clicks: list[Any], n: int, timeout_s: float) -> dict[str, Any]:
    """``count`` peer processes in one consumer group over the clicks, measured as ``one_run`` measures workers
    (the first ``n`` decided)."""
    from bench.peer import PeerTopics, create_peer_topics, drop_internal_topics
    from stream import toymodel
    from stream.synth import traffic

    with bench_topics(f"scalepeer{count}") as (s, t, tmp):
        toymodel.build_registry(s.registry_path, version="toy-bench")
        pt = PeerTopics(s.topic_prefix)
        asyncio.run(create_peer_topics(s))
        procs = [subprocess.Popen([sys.executable, "-m", "bench.peer", t.clicks, str(10**12)], env=worker_env(s),
                                  stdout=(tmp / f"p{i}.log").open("wb"), stderr=subprocess.STDOUT)
                 for i in range(count)]
        try:
            warm = [c.model_copy(update={"click_id": f"W{c.click_id}"}) for c in traffic(500, seed=99)]
            asyncio.run(produce(s, t.clicks, keyed(warm)))
            asyncio.run(consume_count(s, pt.decisions, len(warm), timeout_s))
            t_end = time.monotonic() + timeout_s
            while asyncio.run(_group(s, pt.group)) != ("Stable", count):
                for i, p in enumerate(procs):
                    if p.poll() is not None:
                        raise RuntimeError(f"peer {i} exited: {(tmp / f'p{i}.log').read_text()[-2000:]}")
                if time.monotonic() > t_end:
                    raise RuntimeError(f"the peers' group did not become stable with {count} members in time")
                time.sleep(0.5)
            want = {c.click_id.encode() for c in clicks}
            got = asyncio.run(_received(s, pt.decisions, want, n, timeout_s, produce(s, t.clicks, keyed(clicks))))
        finally:
            for p in procs:
                stop_worker(p)
            asyncio.run(drop_internal_topics(s))
        span_s = max(max(got.values()) - min(got.values()), 1e-3) if got else float("nan")
        return {"peers": count, "decided": len(got), "first_to_last_decision_s": round(span_s, 2),
                "clicks_per_s": round(len(got) / span_s)}


async def _received(s: Any, topic: str, want: set[bytes], n: int, timeout_s: float,
                    sending: Any) -> dict[bytes, float]:
    """Wall-clock time each wanted key first arrives on ``topic`` while ``sending`` runs, until ``n`` did.
    (Quix stamps an output with its input's timestamp, here the click's event time: the peer's decisions carry
    no time of their own, so they are timed as they arrive, every 50 ms at most.)"""
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(topic, group_id=None, auto_offset_reset="earliest", **s.kafka_client_kwargs())
    await c.start()
    got: dict[bytes, float] = {}
    try:
        send = asyncio.ensure_future(sending)
        t_end = time.monotonic() + timeout_s
        while len(got) < n and time.monotonic() < t_end:
            for batch in (await c.getmany(timeout_ms=50, max_records=50_000)).values():
                now = time.monotonic()
                for m in batch:
                    if m.key in want and m.key not in got:
                        got[m.key] = now
        await send
    finally:
        await c.stop()
    return got


def run(n: int = 100_000, workers: list[int] | None = None, peers: list[int] | None = None,
        timeout_s: float = 600.0) -> dict[str, Any]:
    from bench.peer import quix_missing
    clicks = backlog(n)  # n timed, then the tail
    load_before = os.getloadavg()[0]
    runs = [one_run(w, clicks, n, timeout_s) for w in (workers or [1, 2])]
    why = quix_missing()
    peer_runs = [] if why else [peer_run(p, clicks, n, timeout_s) for p in ([1, 2] if peers is None else peers)]
    out: dict[str, Any] = {"clicks": n, "cpu_cores": os.cpu_count(), "load_avg_1m_before": round(load_before, 2)}
    for r in runs:
        k = f"{r['workers']}_worker{'s' if r['workers'] > 1 else ''}"
        out[f"{k}_clicks_per_s"] = r["clicks_per_s"]
        out[f"{k}_decided"] = r["decided"]
        out[f"{k}_first_to_last_decision_s"] = r["first_to_last_decision_s"]
    if len(runs) > 1 and runs[0]["clicks_per_s"]:
        out["speedup_last_vs_first"] = round(runs[-1]["clicks_per_s"] / runs[0]["clicks_per_s"], 2)
    if why:
        out["peers"] = f"skipped: {why}"
    for r in peer_runs:
        k = f"{r['peers']}_peer{'s' if r['peers'] > 1 else ''}"
        out[f"{k}_clicks_per_s"] = r["clicks_per_s"]
        out[f"{k}_decided"] = r["decided"]
        same = [w for w in runs if w["workers"] == r["peers"]]
        if same and r["clicks_per_s"]:
            out[f"{k}_workers_to_peers_ratio"] = round(same[0]["clicks_per_s"] / r["clicks_per_s"], 3)
    out["partitions"] = runs[0]["partitions"]
    out["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    return out
