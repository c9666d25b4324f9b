"""``slidr demo``: the whole loop on the local services, in minutes.

1. start Kafka + Redis (``slidr up``) and create this run's topics (a fresh prefix, so runs never mix);
2. simulate a few days of traffic with ground truth;
3. train the MLP (and baselines inside the report), calibrate per slice, evaluate, write the report;
4. publish the model to the registry, load customer profiles and IP flags into Redis;
5. start a detector worker (``slidr worker``, a separate process) and stream the last hours of the simulated
   traffic through Kafka;
6. read every decision back and print what billing would see: IVR / FPR / robotic coverage per slice, true bot
   recall and human false-invalidation (ground truth), click-to-decision latency.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from slidr.redact import redact_url
from slidr.settings import Settings, get_settings
from slidr.topics import Topics


def _step(msg: str) -> float:
    print(f"\n== {msg}", flush=True)
    return time.perf_counter()


def _done(t0: float, what: str = "") -> None:
    print(f"   done in {time.perf_counter() - t0:.1f} s {what}", flush=True)


def window_dataset(src: Path, out: Path, hours: float, warmup_hours: float) -> dict[str, Any]:
    """Split the end of dataset ``src`` into ``out/warmup`` (``warmup_hours`` of history that only fills the
    worker's counters) and ``out/live`` (the last ``hours``, which is scored and summarised)."""
    from models.data.dataset import load_dataset, write_dataset

    ds = load_dataset(src)
    end = max(c.ts for c in ds.clicks) + 1
    live_start = end - int(hours * 3_600_000)
    warm_start = live_start - int(warmup_hours * 3_600_000)
    info: dict[str, Any] = {"end_ms": end, "live_start_ms": live_start, "warmup_start_ms": warm_start}
    for name, lo, hi in (("warmup", warm_start, live_start), ("live", live_start, end)):
        clicks = [c for c in ds.clicks if lo <= c.ts < hi]
        ids = {c.click_id for c in clicks}
        purchases = [p for p in ds.purchases if p.click_id in ids]
        truth = [{"click_id": k, "is_bot": b, "archetype": a} for k, (b, a) in ds.truth.items() if k in ids] \
            if ds.truth else None
        write_dataset(out / name, clicks, purchases, list(ds.customers.values()), ds.ip_ranges, truth,
                      {**ds.meta, "window": {"start_ms": lo, "end_ms": hi}})
        info[name] = len(clicks)
    return info


async def collect(s: Settings, n_clicks: int, timeout_s: float, alive: Any = lambda: True
                  ) -> tuple[dict[str, Any], dict[str, int]]:
    """Read decisions until every click has one (or the timeout); also the clicks' producer timestamps."""
    from aiokafka import AIOKafkaConsumer

    from schemas.events import decode_decision

    t = Topics(s.topic_prefix)
    cons = AIOKafkaConsumer(t.decisions, t.clicks, group_id=None, auto_offset_reset="earliest",
                            enable_auto_commit=False, **s.kafka_client_kwargs())
    await cons.start()
    decisions: dict[str, Any] = {}
    sent_at: dict[str, int] = {}
    decided_ts: dict[str, int] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while (len(decisions) < n_clicks or len(sent_at) < n_clicks) and time.monotonic() < deadline:
            if not alive():
                raise RuntimeError("the worker exited before deciding every click: see its log")
            batch = await cons.getmany(timeout_ms=500, max_records=20_000)
            for tp, msgs in batch.items():
                for m in msgs:
                    if tp.topic == t.clicks:
                        sent_at[orjson.loads(m.value)["click_id"]] = m.timestamp  # producer send time
                    else:
                        d = decode_decision(m.value)
                        if d.click_id not in decisions or d.revision >= decisions[d.click_id].revision:
                            decisions[d.click_id] = d
                            decided_ts[d.click_id] = m.timestamp
    finally:
        await cons.stop()
    lat = {k: decided_ts[k] - sent_at[k] for k in decided_ts if k in sent_at}
    return decisions, lat


def summarize(live: Path, decisions: dict[str, Any], latency_ms: dict[str, int], coverage_k: int
              ) -> dict[str, Any]:
    """Per-slice IVR / FPR / robotic coverage of the streamed decisions on the live clicks, truth metrics
    (simulated data), click-to-decision latency percentiles."""
    from models.data.dataset import load_dataset
    from models.metrics import rates, robotic_mask, truth_metrics

    ds = load_dataset(live)
    clicks = ds.clicks
    heavy = robotic_mask([c.user_key for c in clicks], [c.ts for c in clicks], coverage_k)
    ids = [c.click_id for c in clicks]
    decided = np.array([i in decisions for i in ids])
    flag = np.array([i in decisions and not decisions[i].valid for i in ids])
    purchased = np.array([i in ds.purchased_click_ids for i in ids])
    slices = np.array([c.slice for c in clicks])
    out: dict[str, Any] = {"clicks": len(ids), "decided": int(decided.sum()),
                           "overall": rates(flag, purchased, heavy), "slices": {}}
    for sl in sorted(set(slices)):
        m = slices == sl
        out["slices"][str(sl)] = rates(flag[m], purchased[m], heavy[m])
    if ds.truth:
        bot = np.array([ds.truth[i][0] for i in ids])
        arch = np.array([ds.truth[i][1] for i in ids])
        tm = truth_metrics(flag, bot, arch)
        out["true_bot_recall"] = tm["bot_recall"]
        out["true_human_false_invalidation"] = tm["human_false_invalidation"]
        for sl in out["slices"]:
            m = slices == sl
            out["slices"][sl]["true_bot_recall"] = truth_metrics(flag[m], bot[m], arch[m])["bot_recall"]
    lat = np.array([latency_ms[i] for i in ids if i in latency_ms], dtype=np.float64)
    if lat.size:
        out["latency_ms"] = {p: float(np.percentile(lat, q)) for p, q in
                             (("p50", 50), ("p99", 99), ("p99.9", 99.9), ("max", 100))}
    return out


def print_summary(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    tab = Table(title=f"live traffic: {r['decided']} of {r['clicks']} clicks decided")
    for col in ("slice", "clicks", "IVR", "FPR", "coverage", "true bot recall"):
        tab.add_column(col, justify="right")

    def row(name: str, x: dict[str, Any], recall: float | None) -> None:
        tab.add_row(name, f"{x['n']:,}", f"{x['ivr']:.3f}", f"{x['fpr']:.4f}", f"{x['coverage']:.3f}",
                    "-" if recall is None else f"{recall:.3f}")

    for sl, x in r["slices"].items():
        row(sl, x, x.get("true_bot_recall"))
    row("overall", r["overall"], r.get("true_bot_recall"))
    Console().print(tab)
    if "true_human_false_invalidation" in r:
        print(f"true human false-invalidation rate: {r['true_human_false_invalidation']:.4f}")
    if "latency_ms" in r:
        lm = r["latency_ms"]
        print("click-to-decision latency (producer send -> decision published): "
              + ", ".join(f"{k} {v:.0f} ms" for k, v in lm.items()))


def train_and_calibrate(data: Path, model: Path, report: Path, fpr_budget: float | None) -> dict[str, Any]:
    """Train the MLP, calibrate per slice (falling back, loudly, to one global threshold when the slice
    program is infeasible under the budget), evaluate on the held-out day and write the report."""
    from models.calibrate import CalibrationError
    from models.config import TrainConfig
    from models.pipeline import calibrate_dir, evaluate_dir, load_training_data, train_to_dir
    from models.report import write_report

    cfg = TrainConfig().replace(model="mlp")
    td = load_training_data(data, cfg)
    manifest = train_to_dir(data, model, "mlp", cfg, td)
    method = "slice"
    try:
        calibrate_dir(model, data, fpr_budget, "slice", td)
    except CalibrationError as e:
        print(f"   slice-level calibration infeasible: {e}\n   -> using one global threshold at the budget")
        method = "global"
        calibrate_dir(model, data, fpr_budget if fpr_budget is not None else cfg.fpr_budget, "global", td)
    ev = evaluate_dir(model, data, "test", td)
    rep = write_report(model, data, report, td=td)
    return {"model_version": manifest["model_version"], "calibration": method, "evaluation": ev,
            "report": str(rep)}


def run_demo(work: Path, *, scenario: str = "default", seed: int = 7, hours: float = 1.0, warmup_hours: float = 24.0,
             rate: float | None = 500.0, fpr_budget: float | None = None, keep_topics: bool = False,
             timeout_s: float = 600.0) -> dict[str, Any]:
    from models.data.simulate import simulate_to
    from models.registry import publish
    from slidr import services
    from stream import cache

    base = get_settings()
    work = work.resolve()
    prefix = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    s = base.model_copy(update={"topic_prefix": prefix, "worker_id": f"{prefix}-detector",
                                "redis_key_prefix": prefix, "registry_path": work / "registry",
                                "home": base.home.resolve()})

    t0 = _step("1/6 local services: Kafka (KRaft) + redis-server")
    services.up(s)
    _done(t0, f"({base.kafka_bootstrap}, {redact_url(base.redis_url)}); topic prefix {prefix}")

    t0 = _step(f"2/6 simulate scenario {scenario!r} (seed {seed})")
    sim = simulate_to(work / "data", scenario, seed)
    _done(t0, f"-> {work / 'data'} {getattr(sim, 'meta', {}).get('counts', '')}")

    t0 = _step("3/6 train the MLP, calibrate per slice, evaluate on the held-out day, write the report")
    res = train_and_calibrate(work / "data", work / "model", work / "report", fpr_budget)
    _done(t0, f"(model {res['model_version']}, calibration: {res['calibration']})")
    ev = res["evaluation"]
    print(f"   offline, held-out day: {orjson.dumps(ev.get('overall', {})).decode()[:400]}")

    t0 = _step("4/6 publish to the registry, load profiles into Redis")
    version = publish(work / "model", s, activate=True, stable=True)
    n_keys = cache.load(s, cache.profiles_from_dir(work / "data"))
    _done(t0, f"(ACTIVE={version}, {n_keys} profile keys)")

    t0 = _step(f"5/6 start a worker; stream {warmup_hours:g} h of history at full speed (fills the counters), "
               f"then the last {hours:g} h at {f'{rate:g} clicks/s' if rate else 'full speed'}")
    services.create_topics(s)
    win = window_dataset(work / "data", work / "stream", hours, warmup_hours)
    env = {**os.environ, "SLIDR_TOPIC_PREFIX": prefix, "SLIDR_WORKER_ID": s.worker_id,
           "SLIDR_REDIS_KEY_PREFIX": prefix, "SLIDR_REGISTRY_PATH": str(s.registry_path),
           "SLIDR_HOME": str(s.home), "SLIDR_WORKER_WEB_PORT": "0"}
    (s.home / "faust").mkdir(parents=True, exist_ok=True)
    log = (work / "worker.log").open("wb")
    worker = subprocess.Popen([sys.executable, "-m", "slidr", "worker", "--loglevel", "warning"], env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        from models.data.produce import produce

        def alive() -> bool:
            return worker.poll() is None

        for name, r in (("warmup", None), ("live", rate)):
            t1 = time.perf_counter()
            pr = asyncio.run(produce(work / "stream" / name, prefix=prefix, settings=s, restart=True,
                                     progress=True, rate=r))
            decisions, lat = asyncio.run(collect(s, win["warmup"] + win["live"] if name == "live"
                                                 else win["warmup"], timeout_s, alive))
            print(f"   {name}: produced {pr.clicks} clicks + {pr.purchases} purchases at {pr.clicks_per_s:,.0f}/s;"
                  f" all decided after {time.perf_counter() - t1:.1f} s")
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        log.close()
    _done(t0, f"(worker log: {work / 'worker.log'})")

    t0 = _step("6/6 what billing sees")
    from models.config import TrainConfig

    summary = summarize(work / "stream" / "live", decisions, lat, TrainConfig().coverage_k)
    print_summary(summary)
    summary["report"] = res.get("report")
    summary["model_version"] = version
    (work / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    print(f"\nreport: {res.get('report')}\nsummary: {work / 'summary.json'}")
    if not keep_topics:
        services.drop_topics(s, prefix)
    return summary
