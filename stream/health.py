"""The worker's health, as its own verdict on its /metrics endpoint, and the probe that reads it (`slidr health`).

Every ``CHECK_EVERY_S`` the worker (a Faust timer, ``stream/app.py``) checks, and publishes one gauge per check
plus ``slidr_worker_healthy`` and the time of the verdict:
- ``broker``: a metadata request through the worker's own producer client answers within ``BROKER_TIMEOUT_S``;
- ``assigned``: the consumer group gave this worker partitions (a worker beyond the partition count has none);
- ``model``: the IP stage holds a loaded, verified model;
- ``progress``: not stuck: while the stages' input partitions (clicks, by-user, by-ip; not the table changelogs,
  which hold the worker's own writes and are read only during recovery) have lag, or a stage awaits a partition
  fetched again after a jump (``Stage.rewinding``), or has a batch in progress, or the IP stage holds clicks
  (``IpStage.n_held``: read and acked without counting, so no lag shows them; its timer releases them within
  ``watermark_idle_s`` once their inputs go quiet, and that release is a batch), or messages read stay
  uncommitted (``faust_fixes.commit_lag``: read, so no lag shows them, and never counted as acked; healthy, the
  next commit takes them within seconds of their batch), a stage completed a batch
  within ``health_stuck_after_s`` (settings; an idle worker with no lag is not stuck, nor one that is
  rebalancing or recovering its tables: its inputs are paused meanwhile).
The first verdict comes once the tables have recovered (Faust starts its timers then).
The probe (``probe``) reads the endpoint and passes only when the verdict is healthy and fresh: a verdict older than
``STALE_AFTER_S`` means the event loop no longer runs the timer (blocked or dead), which is unhealthy too.

The worker does not wait for a supervisor's probe to act on its own verdict (``Watchdog``, a thread: it works
while the event loop is blocked): stuck for ``health_stuck_after_s`` while the broker answers, or no verdict for
that long (the loop blocked), it stops the process without committing (``stages.fail_stop``, exit 70), so that
any supervisor (Kubernetes, compose's restart policy, systemd) restarts it and the restart redelivers what it
held. A deadlock whose cause is unknown would otherwise hold its partitions for good: the group sees a live
member, since the consumer's heartbeats come from another thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from stream import metrics

log = logging.getLogger(__name__)

CHECK_EVERY_S = 5.0
BROKER_TIMEOUT_S = 5.0
STALE_AFTER_S = 30.0
CHECKS = ("broker", "assigned", "model", "progress")


class Health:
    """The worker-side checks; ``stages`` expose ``batches`` (completed batches), the IP stage ``model``."""

    def __init__(self, stages: Sequence[Any], lag: Callable[[], int], assigned: Callable[[], bool],
                 client: Callable[[], Any], stuck_after_s: float = 60.0,
                 busy: Callable[[], bool] = lambda: False, uncommitted: Callable[[], int] = lambda: 0) -> None:
        self.stages = stages
        self.lag = lag
        self.assigned = assigned
        self.client = client
        self.stuck_after_s = stuck_after_s
        self.busy = busy  # rebalancing or recovering tables: inputs paused, not stuck
        self.uncommitted = uncommitted  # input messages read and not committed (faust_fixes.commit_lag)
        self._batches = -1
        self._moved = time.monotonic()
        self.checked_at: float | None = None  # monotonic time of the last check (None: none yet)
        self.broker_ok = True
        self.last: dict[str, bool] = {}
        self.busy_since: float | None = None  # when the current rebalance / table recovery began (None: none)
        self._busy_logged = 0.0

    async def broker_answers(self) -> bool:
        try:
            await asyncio.wait_for(self.client().fetch_all_metadata(), BROKER_TIMEOUT_S)
            return True
        except Exception:
            return False

    async def check(self) -> dict[str, bool]:
        now = time.monotonic()
        batches = sum(st.batches for st in self.stages)
        # work pending: input lag (Faust's read offsets), partitions a stage awaits since a jump (their events were
        # read and refused: no lag shows them), a batch in progress (one that never ends holds the stage's lock),
        # clicks the IP stage holds (read and acked without counting: no lag shows them either), messages read and
        # not committed (a message never counted as acked keeps its partition's commits behind it for good)
        pending = self.lag() + sum(len(getattr(st, "rewinding", ())) for st in self.stages) + sum(
            1 for st in self.stages if getattr(st, "batch_since", None) is not None) + sum(
            sum(getattr(st, "n_held", {}).values()) for st in self.stages) + self.uncommitted()
        busy = self.busy()
        if batches != self._batches or pending == 0 or busy:
            self._batches, self._moved = batches, now
        self.busy_since = (self.busy_since or now) if busy else None
        if self.busy_since is not None and now - self.busy_since > self.stuck_after_s and now - self._busy_logged > 60:
            self._busy_logged = now  # (not judged stuck meanwhile: say so, a rebalance that never ends shows here)
            log.warning("rebalancing or recovering tables for %.0f s, with work pending: %d", now - self.busy_since,
                        pending)
        self.broker_ok = await self.broker_answers()
        got = {
            "broker": self.broker_ok,
            "assigned": self.assigned(),
            "model": all(getattr(st, "model", True) is not None for st in self.stages),
            "progress": now - self._moved <= self.stuck_after_s,
        }
        for name, ok in got.items():
            metrics.HEALTH_CHECK.labels(name).set(1 if ok else 0)
        metrics.HEALTHY.set(1 if all(got.values()) else 0)
        metrics.HEALTH_TIME.set(time.time())
        self.checked_at, self.last = time.monotonic(), got
        return got

    def stuck(self, now: float) -> str:
        """Why the worker is stuck ('' when it is not): see ``Watchdog``."""
        if self.checked_at is None:
            return ""  # no verdict yet: starting (tables recovering), not judged
        quiet = now - self.checked_at
        blocked = f"no health check for {quiet:.0f} s (the event loop is blocked)"
        if quiet > self.stuck_after_s:
            return blocked
        if self.broker_ok and now - self._moved > self.stuck_after_s:
            return blocked if quiet > 2 * CHECK_EVERY_S else (
                f"no batch completed for {now - self._moved:.0f} s while it has work pending (input lag, a partition "
                f"awaited since a jump, a batch in progress, held clicks or messages read and not committed; "
                f"health_stuck_after_s {self.stuck_after_s:g})")
        return ""

    def start(self) -> None:
        """Judge from now on (the worker's agents start): a loop blocked before the first check counts too."""
        self.checked_at = self._moved = time.monotonic()


class Watchdog(threading.Thread):
    """Stops a stuck worker (module doc): ``on_stuck(reason)`` once ``health.stuck`` names a reason."""

    def __init__(self, health: Health, on_stuck: Callable[[str], None], every_s: float = 1.0) -> None:
        super().__init__(name="slidr-watchdog", daemon=True)
        self.health = health
        self.on_stuck = on_stuck
        self.every_s = every_s
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.every_s):
            why = self.health.stuck(time.monotonic())
            if why:
                self.on_stuck(why)
                return


def read_verdict(text: str) -> tuple[float | None, float | None, dict[str, float]]:
    """(healthy, verdict time, per-check values) from a /metrics exposition (None where absent)."""
    healthy = stamp = None
    checks: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("slidr_worker_healthy "):
            healthy = float(line.split()[1])
        elif line.startswith("slidr_worker_health_timestamp_seconds "):
            stamp = float(line.split()[1])
        elif line.startswith('slidr_worker_health_check{check="'):
            name = line.split('"')[1]
            checks[name] = float(line.rsplit(" ", 1)[1])
    return healthy, stamp, checks


def probe(url: str, stale_after_s: float = STALE_AFTER_S, timeout_s: float = 4.0) -> tuple[bool, str]:
    """(passes, why) for the worker whose /metrics is at ``url``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            text = r.read().decode()
    except OSError as e:
        return False, f"no answer from {url}: {e}"
    healthy, stamp, checks = read_verdict(text)
    if healthy is None or stamp is None:
        return False, "no health verdict yet (starting)"
    age = time.time() - stamp
    failed = sorted(k for k, v in checks.items() if v != 1)
    if age > stale_after_s:
        return False, f"verdict is {age:.0f} s old (the worker's loop does not run its timers)"
    if healthy != 1:
        return False, "failing: " + ", ".join(failed)
    return True, "healthy (" + ", ".join(f"{k} ok" for k in CHECKS) + ")"
