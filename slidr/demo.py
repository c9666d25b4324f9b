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
import logging
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


class Screen:
    """What the demo shows: six numbered steps, one result line each, progress bars for the long ones. Library
    logs (aiokafka, training epochs ...) go to a log file instead (``verbose``: to the screen as well)."""

    def __init__(self, log_path: Path, verbose: bool = False) -> None:
        from rich.console import Console

        self.console = Console(highlight=False)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        root = logging.getLogger()
        self._saved = (root.level, list(root.handlers))
        fh = logging.FileHandler(log_path, mode="w")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.handlers = [fh, *([h for h in root.handlers if isinstance(h, logging.StreamHandler)
                                and not isinstance(h, logging.FileHandler)] if verbose else [])]
        root.setLevel(logging.DEBUG if verbose else logging.INFO)
        logging.captureWarnings(True)
        self.t0 = 0.0

    def close(self) -> None:
        root = logging.getLogger()
        for h in root.handlers:
            if isinstance(h, logging.FileHandler):
                h.close()
        root.setLevel(self._saved[0])
        root.handlers = self._saved[1]
        logging.captureWarnings(False)

    def step(self, msg: str) -> None:
        self.console.print(f"\n[bold]== {msg}[/bold]")
        self.t0 = time.perf_counter()

    def line(self, msg: str) -> None:
        self.console.print(f"   {msg}")

    def done(self, what: str = "") -> None:
        self.line(f"done in {time.perf_counter() - self.t0:.1f} s {what}".rstrip())

    def progress(self, what: str) -> Any:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        return Progress(TextColumn(f"   {what}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=self.console, transient=True)


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


async def collect(s: Settings, n_clicks: int, timeout_s: float, alive: Any = lambda: True,
                  on_progress: Any = lambda n: None) -> tuple[dict[str, Any], dict[str, int]]:
    """Read decisions until every click has one (or the timeout); also the clicks' producer timestamps.
    Returns (latest decision per click id, click id -> decision CreateTime - click CreateTime in ms)."""
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
            on_progress(len(decisions))
    finally:
        await cons.stop()
    lat = {k: decided_ts[k] - sent_at[k] for k in decided_ts if k in sent_at}
    return decisions, lat


async def group_lag(s: Settings, group: str, topics: list[str]) -> int:
    """Records of ``topics`` the consumer group has not committed yet (end offset - committed, summed)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**s.kafka_client_kwargs())
    cons = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **s.kafka_client_kwargs())
    await admin.start()
    await cons.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(s.partitions)]
        ends = await cons.end_offsets(tps)
        got = await admin.list_consumer_group_offsets(group)
        return sum(max(0, end - max(0, got[tp].offset if tp in got else 0)) for tp, end in ends.items())
    finally:
        await cons.stop()
        await admin.close()


def wait_caught_up(s: Settings, timeout_s: float, alive: Any = lambda: True) -> float:
    """Wait until the worker's group has committed the end of its input topics (clicks, by-ip): lag 0, nothing
    left to catch up. Returns the seconds waited."""
    t = Topics(s.topic_prefix)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s and alive():
        if asyncio.run(group_lag(s, s.worker_id, [t.clicks, f"{t.prefix}.by-ip"])) == 0:
            return time.monotonic() - t0
        time.sleep(0.5)
    raise RuntimeError(f"the worker did not catch up (lag > 0) within {timeout_s:.0f} s: see its log")


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


LATENCY_INCLUDES = ("= the decision's Kafka CreateTime (set by the worker when it sends it) - the click's (set by the\n"
                    "     producer when it sends it): producer linger, broker, user stage, the by-ip hop through\n"
                    "     Kafka, Redis MGET, ONNX call; not the decision's broker write or billing's read")


def print_summary(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    tab = Table(title=f"live traffic: {r['decided']} of {r['clicks']} clicks decided")
    for col in ("slice", "clicks", "IVR", "FPR", "coverage", "true bot recall"):
        tab.add_column(col, justify="right")

    def f(v: float | None, nd: int) -> str:
        return "-" if v is None or v != v else f"{v:.{nd}f}"  # None / NaN: nothing to measure it on

    def row(name: str, x: dict[str, Any], recall: float | None) -> None:
        tab.add_row(name, f"{x['n']:,}", f(x["ivr"], 3), f(x["fpr"], 4), f(x["coverage"], 3), f(recall, 3))

    for sl, x in r["slices"].items():
        row(sl, x, x.get("true_bot_recall"))
    row("overall", r["overall"], r.get("true_bot_recall"))
    Console().print(tab)
    if "true_human_false_invalidation" in r:
        print(f"true human false-invalidation rate: {r['true_human_false_invalidation']:.4f}")
    if "latency_ms" in r:
        lm = r["latency_ms"]
        rate = f"{r['live_rate']:g} clicks/s" if r.get("live_rate") else "full speed"
        print(f"click-to-decision latency, live hour at {rate}, started once the worker had caught up (lag 0):")
        print("   " + ", ".join(f"{k} {v:.0f} ms" for k, v in lm.items()))
        print(f"   {LATENCY_INCLUDES}")
    if "warmup" in r:
        w = r["warmup"]
        print(f"warm-up catch-up: {w['clicks']:,} clicks decided in {w['seconds']:.1f} s "
              f"({w['clicks_per_s']:,.0f} clicks/s: the worker's throughput on a backlog)")


def train_and_calibrate(data: Path, model: Path, report: Path, fpr_budget: float | None,
                        say: Any = print) -> dict[str, Any]:
    """Train the MLP, calibrate per slice (falling back, loudly, to one global threshold when the slice
    program is infeasible under the budget), evaluate on the held-out day and write the report."""
    from models.calibrate import CalibrationError
    from models.config import TrainConfig
    from models.pipeline import calibrate_dir, evaluate_dir, load_training_data, train_to_dir
    from models.report import write_report

    cfg = TrainConfig().replace(model="mlp")
    td = load_training_data(data, cfg)
    manifest = train_to_dir(data, model, "mlp", cfg, td)
    say(f"trained {manifest['model_version']} ({manifest['training']['epochs']} epochs)")
    method = "slice"
    try:
        calibrate_dir(model, data, fpr_budget, "slice", td)
    except CalibrationError as e:
        say(f"slice-level calibration infeasible: {e}\n   -> using one global threshold at the budget")
        method = "global"
        calibrate_dir(model, data, fpr_budget if fpr_budget is not None else cfg.fpr_budget, "global", td)
    ev = evaluate_dir(model, data, "test", td)
    say("report: baselines, curves, archetypes, weights ablation (trains a few more models)")
    rep = write_report(model, data, report, td=td)
    return {"model_version": manifest["model_version"], "calibration": method, "evaluation": ev,
            "report": str(rep)}


def _offline_line(ev: dict[str, Any]) -> str:
    o = ev.get("overall", {})
    names = {"ivr": "IVR", "fpr": "FPR", "coverage": "coverage", "auc": "AUC", "bot_recall": "true bot recall",
             "human_false_invalidation": "true human false-invalidation"}
    parts = [f"{v} {o[k]:.3f}" for k, v in names.items() if isinstance(o.get(k), float)]
    return "offline, held-out day: " + ", ".join(parts[:4]) + ("\n   " + ", ".join(parts[4:]) if parts[4:] else "")


def _stop(worker: subprocess.Popen[bytes]) -> None:
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(30)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def run_demo(work: Path, *, scenario: str = "default", seed: int = 7, hours: float = 1.0, warmup_hours: float = 24.0,
             rate: float | None = 500.0, fpr_budget: float | None = None, keep_topics: bool = False,
             timeout_s: float = 600.0, verbose: bool = False) -> dict[str, Any]:
    work = work.resolve()
    screen = Screen(work / "demo.log", verbose)
    try:
        return _run(screen, work, scenario=scenario, seed=seed, hours=hours, warmup_hours=warmup_hours, rate=rate,
                    fpr_budget=fpr_budget, keep_topics=keep_topics, timeout_s=timeout_s)
    finally:
        screen.close()


def _run(screen: Screen, work: Path, *, scenario: str, seed: int, hours: float, warmup_hours: float,
         rate: float | None, fpr_budget: float | None, keep_topics: bool, timeout_s: float) -> dict[str, Any]:
    from models.data.produce import produce
    from models.data.simulate import simulate_to
    from models.registry import publish
    from slidr import services
    from stream import cache

    t_start = time.perf_counter()
    base = get_settings()
    prefix = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    s = base.model_copy(update={"topic_prefix": prefix, "worker_id": f"{prefix}-detector",
                                "redis_key_prefix": prefix, "registry_path": work / "registry",
                                "home": base.home.resolve()})

    screen.step("1/6 local services: Kafka (KRaft) + redis-server")
    services.up(s)
    screen.done(f"({base.kafka_bootstrap}, {redact_url(base.redis_url)})")
    screen.line(f"topic prefix {prefix}")

    screen.step(f"2/6 simulate scenario {scenario!r} (seed {seed})")
    with screen.console.status("   simulating ..."):
        sim = simulate_to(work / "data", scenario, seed)
    c = sim.meta["counts"]
    screen.done(f"-> {work / 'data'}")
    screen.line(f"{c['clicks']:,} clicks ({int(sim.is_bot.sum()):,} bots), {c['purchases']:,} purchases, "
                f"{c['customers']:,} customers")

    screen.step("3/6 train the MLP, calibrate per slice, evaluate on the held-out day, report")
    res = train_and_calibrate(work / "data", work / "model", work / "report", fpr_budget, screen.line)
    screen.line(_offline_line(res["evaluation"]))
    screen.done(f"(calibration: {res['calibration']})")

    screen.step("4/6 publish to the registry, load profiles into Redis")
    version = publish(work / "model", s, activate=True, stable=True)
    n_keys = cache.load(s, cache.profiles_from_dir(work / "data"))
    screen.done(f"(ACTIVE={version}, {n_keys:,} profile keys)")

    screen.step(f"5/6 start a worker; stream {warmup_hours:g} h of history at full speed (its counters),")
    screen.console.print(f"[bold]       then, once it has caught up, the last {hours:g} h at "
                         f"{f'{rate:g} clicks/s' if rate else 'full speed'}[/bold]")
    services.create_topics(s)
    win = window_dataset(work / "data", work / "stream", hours, warmup_hours)
    env = {**os.environ, "SLIDR_TOPIC_PREFIX": prefix, "SLIDR_WORKER_ID": s.worker_id,
           "SLIDR_REDIS_KEY_PREFIX": prefix, "SLIDR_REGISTRY_PATH": str(s.registry_path),
           "SLIDR_HOME": str(s.home), "SLIDR_WORKER_WEB_PORT": "0"}
    (s.home / "faust").mkdir(parents=True, exist_ok=True)
    log = (work / "worker.log").open("wb")
    worker = subprocess.Popen([sys.executable, "-m", "slidr", "worker", "--loglevel", "info"], env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def alive() -> bool:
        return worker.poll() is None

    def phase(name: str, before: int, r: float | None) -> tuple[Any, float, dict[str, Any], dict[str, int]]:
        """Produce the window ``name`` and read until every click so far (``before`` + its own) is decided."""
        t1 = time.perf_counter()
        pr = asyncio.run(produce(work / "stream" / name, prefix=prefix, settings=s, restart=True,
                                 progress=True, rate=r))
        with screen.progress(f"{name}: decided") as bar:
            task = bar.add_task("decided", total=win[name])
            decisions, lat = asyncio.run(collect(s, before + win[name], timeout_s, alive,
                                                 lambda n: bar.update(task, completed=max(0, n - before))))
        return pr, time.perf_counter() - t1, decisions, lat

    try:
        pr, warm_s, _, _ = phase("warmup", 0, None)
        waited = wait_caught_up(s, timeout_s, alive)
        warm = {"clicks": pr.clicks, "seconds": warm_s, "clicks_per_s": pr.clicks / warm_s if warm_s else 0.0}
        screen.line(f"warm-up: {pr.clicks:,} clicks + {pr.purchases:,} purchases sent at {pr.clicks_per_s:,.0f}/s,")
        screen.line(f"         all decided after {warm_s:.1f} s ({warm['clicks_per_s']:,.0f} clicks/s catch-up), "
                    f"lag 0 {waited:.1f} s later")
        pr, live_s, decisions, lat = phase("live", win["warmup"], rate)
        screen.line(f"live:    {pr.clicks:,} clicks + {pr.purchases:,} purchases sent at {pr.clicks_per_s:,.0f}/s,")
        screen.line(f"         all decided after {live_s:.1f} s")
    finally:
        _stop(worker)
        log.close()
    screen.done()

    screen.step("6/6 what billing sees")
    from models.config import TrainConfig

    summary = summarize(work / "stream" / "live", decisions, lat, TrainConfig().coverage_k)
    summary |= {"warmup": warm, "live_rate": rate, "report": res.get("report"), "model_version": version}
    print_summary(summary)
    (work / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    if not keep_topics:
        services.drop_topics(s, prefix)
    screen.console.print(f"\nreport:  {res.get('report')}\nsummary: {work / 'summary.json'}\n"
                         f"logs:    {screen.log_path} (slidr demo -v: on screen too)\n"
                         f"         {work / 'worker.log'}\n"
                         f"demo took {time.perf_counter() - t_start:.0f} s")
    return summary
