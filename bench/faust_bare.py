"""A Faust agent that only counts the clicks it consumes: the ceiling of any Faust worker on this broker.

It runs the Faust we run (``stream/faust_fixes.py`` installed, uvloop, the worker's fetch size and buffer
settings) with one agent over ``topic`` and no tables, decoding or producing; it prints one JSON line with the
first-to-last event rate once it has seen ``n`` events. With ``--stock`` it runs Faust as released (no patches,
default fetch size). ``bench/e2e.py`` runs both beside the raw aiokafka passthrough. By hand:
``python -m bench.faust_bare TOPIC N [--stock]`` (env ``SLIDR_*`` for the broker).
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from typing import Any

import orjson


def build(topic: str, n: int, datadir: str, stock: bool = False) -> Any:
    import faust

    from slidr.settings import Settings

    if not stock:
        from stream import faust_fixes  # (stream.app would install the patches on import: not imported here)

        faust_fixes.install()
    s = Settings()
    tuning: dict[str, Any] = {} if stock else {"consumer_max_fetch_size": 256 * 1024}
    app = faust.App(
        f"bench-bare-{uuid.uuid4().hex[:8]}",
        broker=";".join(f"kafka://{b.strip()}" for b in s.kafka_bootstrap.split(",")),
        broker_credentials=s.faust_credentials(), datadir=datadir, web_enabled=False,
        consumer_auto_offset_reset="earliest", stream_buffer_maxsize=16384, topic_partitions=s.partitions, **tuning,
    )
    if stock:
        src = app.topic(topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    else:  # the worker's input topics (stream.app)
        from stream import faust_fixes

        src = faust_fixes.raw_topic(app, topic)
    seen = {"n": 0, "t0": 0.0, "c0": 0.0}

    @app.agent(src, concurrency=1)
    async def count(stream: Any) -> None:
        async for _event in stream.events():
            if seen["n"] == 0:
                seen["t0"], seen["c0"] = time.perf_counter(), time.process_time()
            seen["n"] += 1
            if seen["n"] >= n:
                dt, dc = time.perf_counter() - seen["t0"], time.process_time() - seen["c0"]
                print(orjson.dumps({"events": n, "events_per_s": round(n / dt),
                                    "cpu_us_per_event": round(1e6 * dc / n, 1)}).decode(), flush=True)
                os._exit(0)  # measured: skip the orderly shutdown

    return app


def main(argv: list[str]) -> None:
    import tempfile

    import mode.loop
    from faust.worker import Worker

    try:
        import uvloop  # noqa: F401

        mode.loop.use("uvloop")
    except ImportError:
        pass
    topic, n, stock = argv[0], int(argv[1]), "--stock" in argv[2:]
    with tempfile.TemporaryDirectory() as d:
        app = build(topic, n, d, stock)
        worker = Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False)
        worker.spinner = None
        worker.execute_from_commandline()


if __name__ == "__main__":
    main(sys.argv[1:])
