"""Live monitor and automatic rollback (``slidr monitor``): its own small process, off the hot path.

It reads the decisions and purchases topics and keeps, per slice over a sliding window (``monitor_window_s``):
live IVR (share of clicks invalidated, by ``decided_at``), FPR on purchasing clicks (purchases join their
click's decision as they arrive, minutes to hours later), and decisions by model version. Every tick it checks
the active model's live rates against what its calibration predicted (``check``); when one departs sharply, with
enough samples that noise cannot trigger it, it rolls the registry back to the stable model (the workers follow
within ``model_poll_s``), logs it loudly and counts it in the metrics. Gauges: ``slidr_live_ivr``/``_fpr``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import orjson

from slidr.settings import Settings
from slidr.topics import Topics
from stream import metrics as M

log = logging.getLogger(__name__)
JOIN_MAX = 2_000_000  # decisions remembered for joining late purchases (oldest forgotten first)


@dataclass
class LiveStats:
    """Decisions and joined purchases over a sliding window of wall-clock milliseconds."""

    window_ms: int
    decisions: deque[tuple[int, str, bool, str]] = field(default_factory=deque)  # (decided_at, slice, valid, ver)
    purchases: deque[tuple[int, str, bool, str]] = field(default_factory=deque)  # (joined at, ...)
    by_click: OrderedDict[str, tuple[str, bool, str]] = field(default_factory=OrderedDict)
    waiting: OrderedDict[str, int] = field(default_factory=OrderedDict)  # purchases seen before their decision

    def add_decision(self, d: dict[str, Any]) -> None:
        cid = d["click_id"]
        row = (d["slice"], bool(d["valid"]), d["model_version"])
        self.decisions.append((int(d["decided_at"]), *row))
        self.by_click[cid] = row
        self.by_click.move_to_end(cid)
        if len(self.by_click) > JOIN_MAX:
            self.by_click.popitem(last=False)
        at = self.waiting.pop(cid, None)
        if at is not None:
            self.purchases.append((max(at, int(d["decided_at"])), *row))

    def add_purchase(self, p: dict[str, Any], now_ms: int) -> None:
        row = self.by_click.get(p["click_id"])
        if row is None:
            self.waiting[p["click_id"]] = now_ms
            if len(self.waiting) > JOIN_MAX:
                self.waiting.popitem(last=False)
        else:
            self.purchases.append((now_ms, *row))

    def _expire(self, now_ms: int) -> None:
        lo = now_ms - self.window_ms
        for q in (self.decisions, self.purchases):
            while q and q[0][0] < lo:
                q.popleft()

    def rates(self, now_ms: int, version: str | None = None) -> dict[str, dict[str, float]]:
        """Per slice and ``overall``: n, invalid, ivr, n_purchased, fpr (only decisions of ``version`` if given)."""
        self._expire(now_ms)
        acc: dict[str, list[int]] = {}
        for q, k in ((self.decisions, 0), (self.purchases, 2)):
            for _, sl, valid, ver in q:
                if version is not None and ver != version:
                    continue
                for key in (sl, "overall"):
                    a = acc.setdefault(key, [0, 0, 0, 0])
                    a[k] += 1
                    a[k + 1] += not valid
        return {key: {"n": a[0], "invalid": a[1], "ivr": a[1] / a[0] if a[0] else 0.0,
                      "n_purchased": a[2], "fpr": a[3] / a[2] if a[2] else 0.0} for key, a in acc.items()}

    def by_version(self, now_ms: int) -> dict[str, int]:
        self._expire(now_ms)
        out: dict[str, int] = {}
        for _, _, _, ver in self.decisions:
            out[ver] = out.get(ver, 0) + 1
        return out


def check(overall: dict[str, float], calibration: dict[str, Any], s: Settings) -> str:
    """Why the active model's live rates call for a rollback ('' when they do not): live IVR above
    ``monitor_ivr_factor`` x (and ``monitor_ivr_margin`` over) what its calibration measured on validation
    (``monitor_ivr_max`` when the calibration has no such figure), or live FPR above ``monitor_fpr_factor`` x
    (and ``monitor_fpr_margin`` over) its FPR budget, each only with at least ``monitor_min_decisions`` decisions
    / ``monitor_min_purchases`` purchases in the window."""
    pred = ((calibration.get("validation") or {}).get("overall") or {}).get("ivr")
    ivr_limit = (max(pred * s.monitor_ivr_factor, pred + s.monitor_ivr_margin) if pred is not None
                 else s.monitor_ivr_max)
    if overall.get("n", 0) >= s.monitor_min_decisions and overall["ivr"] > ivr_limit:
        return (f"live IVR {overall['ivr']:.3f} over {int(overall['n'])} decisions > {ivr_limit:.3f} "
                f"(calibration predicted {pred if pred is not None else 'nothing'})")
    budget = calibration.get("fpr_budget")
    if budget is not None:
        fpr_limit = max(budget * s.monitor_fpr_factor, budget + s.monitor_fpr_margin)
        if overall.get("n_purchased", 0) >= s.monitor_min_purchases and overall["fpr"] > fpr_limit:
            return (f"live FPR {overall['fpr']:.3f} over {int(overall['n_purchased'])} purchasing clicks > "
                    f"{fpr_limit:.3f} (budget {budget})")
    return ""




class Monitor:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.t = Topics(s.topic_prefix)
        self.stats = LiveStats(int(s.monitor_window_s * 1000))
        self.rolled_back: set[str] = set()

    def tick(self, now_ms: int) -> str:
        """Update the gauges and roll back when ``check`` says so; returns the rollback's reason ('' if none)."""
        from models import registry

        for sl, r in self.stats.rates(now_ms).items():
            M.LIVE_IVR.labels(sl).set(r["ivr"])
            M.LIVE_FPR.labels(sl).set(r["fpr"])
        active, stable = registry.active_version(self.s), registry.stable_version(self.s)
        if active is None or active == stable or active in self.rolled_back:
            return ""
        calib = orjson.loads((self.s.registry_path / active / "calibration.json").read_bytes())
        reason = check(self.stats.rates(now_ms, active).get("overall", {}), calib, self.s)
        if reason:
            self.rolled_back.add(active)  # once per version: no retry storm on a registry that refuses
            try:
                to = registry.rollback(self.s, reason=f"automatic: {reason}")  # recorded in the history
            except registry.RegistryError as e:
                log.critical("model %s should be rolled back (%s) but the registry refused: %s", active, reason, e)
                return reason
            M.ROLLBACKS.labels(active).inc()
            log.critical("AUTOMATIC ROLLBACK of model %s to %s: %s", active, to, reason)
        return reason

    async def run(self, stop: asyncio.Event | None = None) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        c = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **self.s.kafka_client_kwargs())
        await c.start()
        try:
            tps = [TopicPartition(t, p) for t in (self.t.decisions, self.t.purchases)
                   for p in (c.partitions_for_topic(t) or range(self.s.partitions))]
            c.assign(tps)
            since = int(time.time() * 1000) - int(self.s.monitor_window_s * 1000)
            offs = await c.offsets_for_times(dict.fromkeys(tps, since))
            for tp in tps:
                o = offs.get(tp)
                if o is None:
                    await c.seek_to_end(tp)
                else:
                    c.seek(tp, o.offset)
            log.warning("monitoring %s and %s (window %g s)", self.t.decisions, self.t.purchases,
                        self.s.monitor_window_s)
            next_tick = time.monotonic()
            while stop is None or not stop.is_set():
                batch = await c.getmany(timeout_ms=500, max_records=10_000)
                now = int(time.time() * 1000)
                for tp, msgs in batch.items():
                    for m in msgs:
                        if m.value is None:
                            continue
                        try:
                            v = orjson.loads(m.value)
                            if tp.topic == self.t.decisions:
                                self.stats.add_decision(v)
                                M.LIVE_DECISIONS.labels(v["model_version"]).inc()
                            else:
                                self.stats.add_purchase(v, now)
                        except (orjson.JSONDecodeError, KeyError, TypeError):
                            log.warning("monitor: skipping a malformed record at %s@%d", tp, m.offset)
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + 1.0
                    self.tick(now)
        finally:
            await c.stop()


def run_monitor(s: Settings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    M.start(s.metrics_port + 1 if s.metrics_port else 0, s.metrics_bind)
    asyncio.run(Monitor(s).run())
