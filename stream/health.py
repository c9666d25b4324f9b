"""The worker's health, as its own verdict on its /metrics endpoint, and the probe that reads it (`slidr health`).

Every ``CHECK_EVERY_S`` the worker (a Faust timer, ``stream/app.py``) checks, and publishes one gauge per check
plus ``slidr_worker_healthy`` and the time of the verdict:
- ``broker``: a metadata request through the worker's own producer client answers within ``BROKER_TIMEOUT_S``;
- ``assigned``: the consumer group gave this worker partitions (a worker beyond the partition count has none);
- ``model``: the IP stage holds a loaded, verified model;
- ``progress``: not stuck: while the stages' input partitions (clicks, by-user, by-ip; not the table changelogs,
  which hold the worker's own writes and are read only during recovery) have lag, a stage completed a batch
  within ``health_stuck_after_s`` (settings; an idle worker with no lag is not stuck).
The first verdict comes once the tables have recovered (Faust starts its timers then).
The probe (``probe``) reads the endpoint and passes only when the verdict is healthy and fresh: a verdict older than
``STALE_AFTER_S`` means the event loop no longer runs the timer (blocked or dead), which is unhealthy too.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from stream import metrics

CHECK_EVERY_S = 5.0
BROKER_TIMEOUT_S = 5.0
STALE_AFTER_S = 30.0
CHECKS = ("broker", "assigned", "model", "progress")


class Health:
    """The worker-side checks; ``stages`` expose ``batches`` (completed batches), the IP stage ``model``."""

    def __init__(self, stages: Sequence[Any], lag: Callable[[], int], assigned: Callable[[], bool],
                 client: Callable[[], Any], stuck_after_s: float = 60.0) -> None:
        self.stages = stages
        self.lag = lag
        self.assigned = assigned
        self.client = client
        self.stuck_after_s = stuck_after_s
        self._batches = -1
        self._moved = time.monotonic()

    async def broker_answers(self) -> bool:
        try:
            await asyncio.wait_for(self.client().fetch_all_metadata(), BROKER_TIMEOUT_S)
            return True
        except Exception:
            return False

    async def check(self) -> dict[str, bool]:
        now = time.monotonic()
        batches = sum(st.batches for st in self.stages)
        lag = self.lag()
        if batches != self._batches or lag == 0:
            self._batches, self._moved = batches, now
        got = {
            "broker": await self.broker_answers(),
            "assigned": self.assigned(),
            "model": all(getattr(st, "model", True) is not None for st in self.stages),
            "progress": now - self._moved <= self.stuck_after_s,
        }
        for name, ok in got.items():
            metrics.HEALTH_CHECK.labels(name).set(1 if ok else 0)
        metrics.HEALTHY.set(1 if all(got.values()) else 0)
        metrics.HEALTH_TIME.set(time.time())
        return got


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
