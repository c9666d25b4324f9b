"""The reference billing consumer: latest revision per click wins, spend per advertiser (pure + real broker)."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaProducer

from schemas import Decision
from stream.billing import ledger_of, read_all
from tests.conftest import KEnv

NOW = 1_762_000_000_000


def dec(click: str, valid: bool, revision: int = 0, adv: str = "a1", cpc: float = 0.5) -> Decision:
    return Decision(click_id=click, valid=valid, score=0.1 if valid else 0.9, threshold=0.5, slice="app:out",
                    model_version="m", revision=revision, decided_at=NOW, event_ts=NOW, advertiser_id=adv, cpc=cpc)


def test_latest_revision_wins_and_duplicates_count_once() -> None:
    led = ledger_of([
        dec("c1", True), dec("c1", True),  # at-least-once duplicate of the live decision
        dec("c2", True), dec("c2", False, revision=1),  # a replay invalidated c2
        dec("c3", False, revision=2), dec("c3", True, revision=1),  # an older revision arriving late loses
        dec("c4", True, adv="a2", cpc=1.25),
    ])
    assert led.records == 7 and len(led.latest) == 4
    assert led.latest["c2"].revision == 1 and not led.latest["c2"].valid
    assert led.latest["c3"].revision == 2
    assert led.summary() == {  # corrections: c2 was billable live and a replay credited it (c3 has no live one)
        "a1": {"billable": 1, "invalidated": 2, "billable_spend": 0.5, "invalidated_spend": 1.0,
               "corrected": 1, "credited_spend": 0.5, "rebilled_spend": 0.0},
        "a2": {"billable": 1, "invalidated": 0, "billable_spend": 1.25, "invalidated_spend": 0.0,
               "corrected": 0, "credited_spend": 0.0, "rebilled_spend": 0.0},
    }


def test_corrections_compare_the_latest_decision_with_the_live_one() -> None:
    led = ledger_of([
        dec("c1", True), dec("c1", False, revision=1), dec("c1", True, revision=2),  # undone by a later replay
        dec("c2", False, cpc=2.0), dec("c2", True, revision=1, cpc=2.0),  # re-billed
        dec("c3", True, cpc=0.25), dec("c3", False, revision=1, cpc=0.25),  # credited
    ])
    row = led.summary()["a1"]
    assert (row["corrected"], row["credited_spend"], row["rebilled_spend"]) == (2, 0.25, 2.0)


@pytest.mark.integration
def test_reads_the_decisions_topic(kenv: KEnv) -> None:
    s = kenv.settings
    sent = [dec(f"c{i}", i % 3 != 0) for i in range(30)] + [dec("c0", True, revision=1), b"not json"]

    async def publish() -> None:
        p = AIOKafkaProducer(**s.kafka_client_kwargs())
        await p.start()
        try:
            for d in sent:
                raw = d if isinstance(d, bytes) else d.to_json()
                key = b"bad" if isinstance(d, bytes) else d.click_id.encode()
                await p.send_and_wait(kenv.topics.decisions, raw, key=key)
        finally:
            await p.stop()

    asyncio.run(publish())
    led = read_all(s, idle_s=2.0)
    assert (len(led.latest), led.records, led.bad_records) == (30, 31, 1)
    assert led.latest["c0"].valid and led.latest["c0"].revision == 1
    assert led.summary()["a1"]["invalidated"] == 9  # c3, c6, ..., c27 (c0 was revalidated by the replay)
    assert led.summary()["a1"]["rebilled_spend"] == 0.5
