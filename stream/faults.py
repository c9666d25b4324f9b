"""Named fault-injection points, for the fault tests: ``SLIDR_FAILPOINTS="ip.score@3,user.flush@5x2"`` makes the
3rd pass through ``hit("ip.score")`` raise ``InjectedFault``, and the 5th and 6th through ``hit("user.flush")``;
``ip.score@3h`` makes the 3rd pass hang instead: it blocks the thread (the worker's event loop) for good, as a
deadlock would (``stream.health.Watchdog`` must stop such a worker).
Unset (production), ``hit`` is one dict lookup per stage batch. The stages' points are listed in
``stream/stages.py`` (``FAILPOINTS``)."""

from __future__ import annotations

import os
import re
import time


class InjectedFault(RuntimeError):
    """Raised at a fail point (never in production: only when SLIDR_FAILPOINTS names the point)."""


def _parse(spec: str) -> dict[str, list[int]]:
    """``name@N[xK]`` items: fail at hits N..N+K-1 (K = 1 by default); ``name@Nh``: hang at hit N."""
    out: dict[str, list[int]] = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        m = re.fullmatch(r"([a-z_.]+)@(\d+)(?:x(\d+)|(h))?", item)
        if m is None:
            raise ValueError(f"SLIDR_FAILPOINTS: bad item {item!r} (want name@N, name@NxK or name@Nh)")
        n, k = int(m[2]), int(m[3] or 1)
        out[m[1]] = [0, n, n + k - 1, 1 if m[4] else 0]  # hits so far, first/last failing hit, hang
    return out


_POINTS = _parse(os.environ.get("SLIDR_FAILPOINTS", ""))


def hit(name: str) -> None:
    p = _POINTS.get(name)
    if p is None:
        return
    p[0] += 1
    if p[1] <= p[0] <= p[2]:
        if p[3]:
            while True:  # hang: blocks the caller's thread for good (the process is killed from outside)
                time.sleep(3600)
        raise InjectedFault(f"injected fault at {name} (hit {p[0]})")
