"""`slidr health`'s probe (stream/health.py) against a real HTTP endpoint serving a verdict (issue 19)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stream.health import Health, Watchdog, probe


@pytest.fixture
def endpoint() -> Iterator[tuple[str, dict[str, str]]]:
    """An HTTP server whose /metrics body is ``page["body"]``."""
    page = {"body": ""}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = page["body"].encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/metrics", page
    finally:
        srv.shutdown()
        srv.server_close()


def _verdict(healthy: int, stamp: float, failing: tuple[str, ...] = ()) -> str:
    checks = "".join(f'slidr_worker_health_check{{check="{c}"}} {0.0 if c in failing else 1.0}\n'
                     for c in ("broker", "assigned", "model", "progress"))
    return f"{checks}slidr_worker_healthy {float(healthy)}\nslidr_worker_health_timestamp_seconds {stamp}\n"


def test_probe_passes_only_a_fresh_healthy_verdict(endpoint: tuple[str, dict[str, str]]) -> None:
    url, page = endpoint
    page["body"] = "# no verdict yet\n"
    assert probe(url) == (False, "no health verdict yet (starting)")
    page["body"] = _verdict(1, time.time())
    ok, why = probe(url)
    assert ok and why.startswith("healthy"), why
    page["body"] = _verdict(0, time.time(), failing=("broker", "progress"))
    assert probe(url) == (False, "failing: broker, progress")
    page["body"] = _verdict(1, time.time() - 120)  # the worker's loop stopped running its timers
    ok, why = probe(url)
    assert not ok and "old" in why, why


def test_probe_fails_when_nothing_answers() -> None:
    import socket

    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        port = so.getsockname()[1]
    ok, why = probe(f"http://127.0.0.1:{port}/metrics")
    assert not ok and "no answer" in why


class _Stage:
    batches = 0


def _health(lag: list[int], busy: list[bool], broker: list[bool]) -> Health:
    h = Health([_Stage()], lambda: lag[0], lambda: True, lambda: None, stuck_after_s=10.0, busy=lambda: busy[0])

    async def answers() -> bool:
        return broker[0]

    h.broker_answers = answers  # type: ignore[method-assign]
    return h


def test_a_worker_is_stuck_without_batches_while_it_has_lag_but_not_while_rebalancing_or_cut_off() -> None:
    lag, busy, broker = [100], [False], [True]
    h = _health(lag, busy, broker)
    t0 = time.monotonic()
    assert h.stuck(t0) == ""  # no verdict yet: starting, not judged
    asyncio.run(h.check())
    assert h.stuck(time.monotonic()) == ""
    h._moved -= 11  # no batch for 11 s with lag
    assert "no batch completed" in h.stuck(time.monotonic())
    assert asyncio.run(h.check())["progress"] is False
    busy[0] = True  # a rebalance (tables recovering): inputs paused, the clock starts over
    asyncio.run(h.check())
    assert h.stuck(time.monotonic()) == ""
    busy[0] = False
    h._moved -= 11
    broker[0] = False  # the broker does not answer: a restart would not help
    asyncio.run(h.check())
    assert h.stuck(time.monotonic()) == ""
    broker[0] = True
    _Stage.batches += 1  # a batch: progress again
    asyncio.run(h.check())
    assert h.stuck(time.monotonic()) == ""
    lag[0] = 0
    h._moved -= 100  # idle with no lag is never stuck
    asyncio.run(h.check())
    assert h.stuck(time.monotonic()) == ""
    assert "event loop is blocked" in h.stuck(time.monotonic() + 11)  # no check for 11 s


def test_the_watchdog_calls_on_stuck_once_with_the_reason() -> None:
    h = _health([5], [False], [True])
    asyncio.run(h.check())
    h._moved -= 11
    got: list[str] = []
    done = threading.Event()
    w = Watchdog(h, lambda why: (got.append(why), done.set()), every_s=0.01)
    w.start()
    assert done.wait(10)
    w.join(5)
    assert not w.is_alive() and len(got) == 1 and "no batch completed" in got[0]
    quiet = Watchdog(_health([0], [False], [True]), got.append, every_s=0.01)
    quiet.start()
    quiet.halt.set()
    quiet.join(5)
    assert not quiet.is_alive() and len(got) == 1


def test_a_stage_awaiting_a_jump_or_holding_a_batch_that_never_ends_is_stuck_without_lag() -> None:
    """(issue 12) The stall seen in a fresh-clone run: the fetcher had read every partition to its end (no lag by
    Faust's read offsets) while a stage refused those events as past a jump, or held a batch that never ended."""
    h = _health([0], [False], [True])
    st = h.stages[0]
    asyncio.run(h.check())
    h._moved -= 11
    asyncio.run(h.check())  # no lag, nothing awaited, no batch in progress: idle, never stuck
    assert h.stuck(time.monotonic()) == ""
    st.rewinding = {("clicks", 0, 110): (0.0, 0.0)}  # type: ignore[attr-defined]
    h._moved -= 11
    asyncio.run(h.check())
    assert "work pending" in h.stuck(time.monotonic())
    st.rewinding = {}  # type: ignore[attr-defined]
    asyncio.run(h.check())  # (idle again: the clock starts over)
    st.batch_since = time.monotonic() - 30  # type: ignore[attr-defined]
    h._moved -= 11
    asyncio.run(h.check())
    assert "work pending" in h.stuck(time.monotonic())
    assert asyncio.run(h.check())["progress"] is False


def test_clicks_held_for_the_watermark_that_never_leave_are_work_pending() -> None:
    """Clicks the IP stage holds were read and acked without counting: no lag shows them. A worker that holds
    some and completes no batch (its timer would release them within the watermark's idle time) is stuck."""
    h = _health([0], [False], [True])
    st = h.stages[0]
    st.n_held = {0: 0, 3: 0}  # type: ignore[attr-defined]
    asyncio.run(h.check())
    h._moved -= 11
    asyncio.run(h.check())  # nothing held: idle
    assert h.stuck(time.monotonic()) == ""
    st.n_held = {0: 0, 3: 12}  # type: ignore[attr-defined]
    h._moved -= 11
    asyncio.run(h.check())
    assert "work pending" in h.stuck(time.monotonic())


def test_messages_read_and_never_committed_are_work_pending() -> None:
    """A message read and never counted as acked keeps its partition's commits behind it; no lag shows it. A
    worker with such messages and no batch completing is stuck (healthy, the next commit takes them)."""
    uncommitted = [0]
    h = Health([_Stage()], lambda: 0, lambda: True, lambda: None, stuck_after_s=10.0,
               uncommitted=lambda: uncommitted[0])

    async def answers() -> bool:
        return True

    h.broker_answers = answers  # type: ignore[method-assign]
    asyncio.run(h.check())
    h._moved -= 11
    asyncio.run(h.check())
    assert h.stuck(time.monotonic()) == ""  # all committed: idle
    uncommitted[0] = 37
    h._moved -= 11
    asyncio.run(h.check())
    assert "not committed" in h.stuck(time.monotonic())


def test_a_rebalance_that_goes_on_past_the_stuck_time_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    lag, busy, broker = [100], [True], [True]
    h = _health(lag, busy, broker)
    h.start()
    asyncio.run(h.check())
    assert h.busy_since is not None and "rebalancing" not in caplog.text
    h.busy_since -= 11.0  # past stuck_after_s (10 s)
    asyncio.run(h.check())
    assert "rebalancing or recovering tables for 11 s, with work pending: 100" in caplog.text
    assert h.stuck(time.monotonic()) == ""  # still not judged stuck: only said
    busy[0] = False
    asyncio.run(h.check())
    assert h.busy_since is None
