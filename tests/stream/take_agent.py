"""A Faust app with one ``take_events`` agent that acks everything it takes (memory store, no tables), run as
its own process by the commit tests: ``python -m tests.stream.take_agent TOPIC GROUP`` (env ``SLIDR_*``)."""

from __future__ import annotations

import sys
import tempfile
from typing import Any


def main(topic: str, group: str) -> None:
    import faust
    from faust.worker import Worker

    from slidr.settings import Settings
    from stream import faust_fixes

    faust_fixes.install()
    s = Settings()
    with tempfile.TemporaryDirectory() as d:
        app = faust.App(group, broker=f"kafka://{s.kafka_bootstrap}", broker_credentials=s.faust_credentials(),
                        datadir=d, web_enabled=False, consumer_auto_offset_reset="earliest",
                        broker_commit_interval=0.5, topic_partitions=s.partitions)
        src = app.topic(topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

        @app.agent(src, concurrency=1)
        async def take(stream: Any) -> None:
            async for events in stream.take_events(100, within=0.05):
                m = events[0].message
                held = faust_fixes.held_since(app.consumer, m.topic, m.partition)
                start = faust_fixes.start_offset(app.consumer, m.topic, m.partition)
                print(f"took {len(events)} held since {held} generation {m.generation_id} start {start}", flush=True)

        worker = Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False)
        worker.spinner = None
        worker.execute_from_commandline()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
