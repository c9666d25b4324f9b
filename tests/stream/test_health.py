"""`slidr health`'s probe (stream/health.py) against a real HTTP endpoint serving a verdict (issue 19)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stream.health import probe


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
