"""The stuck worker's report (``stream.diagnose``): readable from another thread, never raising."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace
from typing import Any

from stream import diagnose


def _stage() -> Any:
    st = SimpleNamespace(name="ip", next_offset={("by-ip", 0): 7}, rewinding={("by-ip", 0, 7): (0.0, 0.0)},
                         batch_since=time.monotonic() - 3, lock=asyncio.Lock(),
                         adopted=0, committed_past=0, n_held={0: 0, 2: 9})
    return st


def test_the_report_names_offsets_jumps_tasks_and_threads_and_survives_what_it_cannot_read() -> None:
    app = SimpleNamespace(consumer=None, consumer_generation_id=4, rebalancing=False)  # consumer unreadable

    async def waits_here(ev: asyncio.Event) -> None:
        await ev.wait()

    async def main() -> str:
        ev = asyncio.Event()
        task = asyncio.create_task(waits_here(ev), name="the-stuck-one")
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        out: list[str] = []
        th = threading.Thread(target=lambda: out.append(diagnose.report(app, [_stage()], loop)))
        th.start()
        while th.is_alive():
            await asyncio.sleep(0.01)
        ev.set()
        await task
        return out[0]

    text = asyncio.run(main())
    assert "ip next offsets: {('by-ip', 0): 7}" in text
    assert "ip awaited since a jump: {('by-ip', 0, 7):" in text
    assert "ip batch in progress: for 3 s" in text
    assert "ip clicks held per partition: {2: 9}" in text
    assert "generation: 4" in text
    assert "assignment: unreadable" in text  # no consumer: reported, not raised
    assert "the-stuck-one: waits_here (test_diagnose.py:" in text and "-> wait (locks.py:" in text
    assert "thread " in text and "in run" in text  # the reporting thread's own stack among them
