"""Reference billing consumer: latest revision per click wins; billable vs invalidated spend per advertiser.

It shows how to consume the decisions topic: keyed by click id, at-least-once (a click may be delivered more
than once), a later ``revision`` (a replay) overrides an earlier one. Corrections: per advertiser, the spend that
replays moved, comparing each click's latest decision with its live one (revision 0): credited (billable live,
invalid now) and re-billed (invalid live, billable now).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from schemas.events import Decision, SchemaError, decode_decision
from slidr.settings import Settings
from slidr.topics import Topics


@dataclass
class Ledger:
    """Latest decision per click and totals per advertiser."""

    latest: dict[str, Decision] = field(default_factory=dict)
    live_valid: dict[str, bool] = field(default_factory=dict)  # the live (revision 0) decision's validity
    bad_records: int = 0
    records: int = 0

    def apply(self, d: Decision) -> None:
        self.records += 1
        if d.revision == 0:
            self.live_valid[d.click_id] = d.valid
        old = self.latest.get(d.click_id)
        if old is None or d.revision >= old.revision:
            self.latest[d.click_id] = d

    def summary(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = defaultdict(lambda: {
            "billable": 0, "invalidated": 0, "billable_spend": 0.0, "invalidated_spend": 0.0,
            "corrected": 0, "credited_spend": 0.0, "rebilled_spend": 0.0})
        for d in self.latest.values():
            row = out[d.advertiser_id]
            kind = "billable" if d.valid else "invalidated"
            row[kind] += 1
            row[f"{kind}_spend"] = round(row[f"{kind}_spend"] + d.cpc, 6)
            live = self.live_valid.get(d.click_id)
            if d.revision > 0 and live is not None and live != d.valid:
                row["corrected"] += 1
                moved = "rebilled_spend" if d.valid else "credited_spend"
                row[moved] = round(row[moved] + d.cpc, 6)
        return dict(sorted(out.items()))


def ledger_of(decisions: Iterable[Decision]) -> Ledger:
    led = Ledger()
    for d in decisions:
        led.apply(d)
    return led


async def _consume(s: Settings, led: Ledger, *, idle_s: float | None, every_s: float | None,
                   from_start: bool) -> None:
    from aiokafka import AIOKafkaConsumer

    cons = AIOKafkaConsumer(Topics(s.topic_prefix).decisions, group_id=None,
                            auto_offset_reset="earliest" if from_start else "latest",
                            enable_auto_commit=False, **s.kafka_client_kwargs())
    await cons.start()
    try:
        last_new, last_print = time.monotonic(), time.monotonic()
        while True:
            batch = await cons.getmany(timeout_ms=500, max_records=10_000)
            for msgs in batch.values():
                for m in msgs:
                    try:
                        led.apply(decode_decision(m.value))
                    except SchemaError:
                        led.bad_records += 1
                last_new = time.monotonic()
            if idle_s is not None and time.monotonic() - last_new > idle_s:
                return
            if every_s is not None and time.monotonic() - last_print > every_s:
                print_summary(led)
                last_print = time.monotonic()
    finally:
        await cons.stop()


def read_all(s: Settings, *, idle_s: float = 3.0) -> Ledger:
    led = Ledger()
    asyncio.run(_consume(s, led, idle_s=idle_s, every_s=None, from_start=True))
    return led


def tail(s: Settings, *, every_s: float = 5.0, from_start: bool = True) -> None:
    led = Ledger()
    try:
        asyncio.run(_consume(s, led, idle_s=None, every_s=every_s, from_start=from_start))
    except KeyboardInterrupt:
        print_summary(led)


def print_summary(led: Ledger, *, as_json: bool = False) -> None:
    summ = led.summary()
    if as_json:
        print(orjson.dumps({"clicks": len(led.latest), "records": led.records, "bad_records": led.bad_records,
                            "advertisers": summ}, option=orjson.OPT_INDENT_2).decode())
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{len(led.latest)} clicks decided ({led.records} records, {led.bad_records} unreadable)")
    for col in ("advertiser", "billable", "invalidated", "billable spend", "invalidated spend", "corrected",
                "credited", "re-billed"):
        t.add_column(col, justify="left" if col == "advertiser" else "right")
    for adv, row in summ.items():
        t.add_row(adv, str(row["billable"]), str(row["invalidated"]), f"{row['billable_spend']:.2f}",
                  f"{row['invalidated_spend']:.2f}", str(row["corrected"]), f"{row['credited_spend']:.2f}",
                  f"{row['rebilled_spend']:.2f}")
    Console().print(t)
