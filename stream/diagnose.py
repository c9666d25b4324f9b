"""What a stuck worker was doing, for its log before the watchdog stops it (``stream.health.Watchdog``).

Read from the watchdog's thread while the event loop may be blocked or running: every part is best effort
(an attribute that changes while it is read is reported as unreadable, never raised), and nothing is changed.
"""

from __future__ import annotations

import asyncio
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any


def _safe(what: str, fun: Any) -> str:
    try:
        return f"{what}: {fun()}"
    except Exception as e:  # racing the loop: report, never raise
        return f"{what}: unreadable ({e!r})"


def stage_state(stage: Any) -> list[str]:
    """A stage's offsets, awaited jumps and batch in progress."""
    now = time.monotonic()
    since = stage.batch_since
    return [
        _safe(f"{stage.name} next offsets", lambda: dict(sorted(stage.next_offset.items()))),
        _safe(f"{stage.name} awaited since a jump",
              lambda: {k: f"{now - first:.0f} s (sought {now - last:.0f} s ago)"
                       for k, (first, last) in stage.rewinding.items()}),
        _safe(f"{stage.name} batch in progress", lambda: "none" if since is None else f"for {now - since:.0f} s"),
        _safe(f"{stage.name} lock held", lambda: stage.lock.locked()),
        _safe(f"{stage.name} committed offsets adopted / found past unhandled clicks",
              lambda: (stage.adopted, stage.committed_past)),
        *([_safe(f"{stage.name} clicks held per partition", lambda: {q: n for q, n in stage.n_held.items() if n})]
          if hasattr(stage, "n_held") else []),
    ]


def consumer_state(app: Any) -> list[str]:
    """Faust's consumer as it stands: assignment, flow, read/committed offsets, highwaters, generation."""
    c = app.consumer
    return [
        _safe("generation", lambda: app.consumer_generation_id),
        _safe("rebalancing", lambda: app.rebalancing),
        _safe("flow active", lambda: (c.flow_active, app.flow_control.is_active())),
        _safe("assignment", lambda: sorted(map(tuple, c.assignment()))),
        _safe("held since generation", lambda: {tuple(tp): g for tp, g in sorted(
            c.__dict__.get("_slidr_held_since", {}).items())}),
        _safe("paused", lambda: sorted(map(tuple, c._paused_partitions))),
        _safe("active", lambda: sorted(map(tuple, c._active_partitions or ()))),
        _safe("read offsets", lambda: {tuple(tp): o for tp, o in sorted(c._read_offset.items())}),
        _safe("committed", lambda: {tuple(tp): o for tp, o in sorted(c._committed_offset.items())}),
        _safe("highwaters", lambda: {tuple(tp): c.highwater(tp) for tp in sorted(c.assignment())}),
        _safe("unacked", lambda: len(c._unacked_messages)),
        _safe("acked", lambda: {tuple(tp): (min(v), max(v), len(v)) for tp, v in c._acked.items() if v}),
    ]


def tasks(loop: asyncio.AbstractEventLoop | None, limit: int = 12) -> list[str]:
    """Every task of the loop and where it waits (racing the loop: a task list that changes is retried)."""
    if loop is None:
        return ["tasks: no loop"]
    for _ in range(3):
        try:
            ts = list(asyncio.all_tasks(loop))
            break
        except RuntimeError:  # the set changed while it was copied
            continue
    else:
        return ["tasks: unreadable"]
    out = [f"{len(ts)} tasks:"]
    for t in ts:
        try:
            where = " -> ".join(f"{f.f_code.co_name} ({f.f_code.co_filename.rsplit('/', 1)[-1]}:{f.f_lineno})"
                                for f in awaits(t.get_coro(), limit))
            out.append(f"  {t.get_name()}: {where if where else repr(t.get_coro())}")
        except Exception as e:
            out.append(f"  {t!r}: unreadable ({e!r})")
    return out


def awaits(coro: Any, limit: int) -> list[Any]:
    """The frames of a suspended coroutine and of what it awaits, outermost first (``Task.get_stack`` gives
    only the outermost)."""
    frames: list[Any] = []
    while coro is not None and len(frames) < limit:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None) or getattr(coro, "ag_frame", None)
        if frame is not None:
            frames.append(frame)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None) or getattr(coro, "ag_await",
                                                                                                 None)
    return frames


def threads() -> list[str]:
    """Every thread's stack."""
    out = []
    for ident, frame in sys._current_frames().items():
        out.append(f"thread {ident}:")
        out.extend("  " + line.rstrip() for line in traceback.format_stack(frame)[-12:])
    return out


def report(app: Any, stages: Sequence[Any], loop: asyncio.AbstractEventLoop | None) -> str:
    lines = ["what the stuck worker was doing:"]
    for st in stages:
        lines += stage_state(st)
    lines += consumer_state(app) + tasks(loop) + threads()
    return "\n".join(lines)
