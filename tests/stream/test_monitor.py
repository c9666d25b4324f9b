"""The live monitor (issue 9): rates over a sliding window, the rollback rule, and an automatic rollback against
a real worker, broker and Redis."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from models import registry
from schemas.events import decode_decision
from slidr.settings import Settings
from stream import toymodel
from stream.monitor import LiveStats, Monitor, check


def _d(cid: str, at: int, valid: bool, sl: str = "app:out", ver: str = "m1") -> dict[str, Any]:
    return {"click_id": cid, "decided_at": at, "valid": valid, "slice": sl, "model_version": ver}


def test_live_rates_join_late_purchases_and_slide() -> None:
    st = LiveStats(window_ms=10_000)
    st.add_purchase({"click_id": "c0"}, now_ms=1_000)  # before its decision arrives
    for i in range(10):
        st.add_decision(_d(f"c{i}", 1_000 + i, valid=i % 5 != 0, sl="app:out" if i < 6 else "desktop:in"))
    st.add_purchase({"click_id": "c1"}, now_ms=2_000)
    r = st.rates(5_000)
    assert r["overall"]["n"] == 10 and r["overall"]["invalid"] == 2 and r["overall"]["ivr"] == 0.2
    assert r["overall"]["n_purchased"] == 2 and r["overall"]["fpr"] == 0.5  # c0 invalid, c1 valid
    assert r["app:out"]["n"] == 6 and r["app:out"]["invalid"] == 2 and r["desktop:in"]["invalid"] == 0
    assert st.rates(5_000, "other") == {}
    assert st.rates(12_500) == {}  # all slid out of the window (the last purchase joined at 2,000)
    assert st.by_version(12_500) == {}


def test_rollback_rule_needs_a_sharp_departure_and_enough_samples() -> None:
    s = Settings(monitor_min_decisions=100, monitor_min_purchases=20)
    cal = {"fpr_budget": 0.01, "validation": {"overall": {"ivr": 0.08}}}
    assert check({"n": 1000, "ivr": 0.2, "n_purchased": 0, "fpr": 0.0}, cal, s) == ""  # 0.2 < 3 x 0.08 + ...
    assert "live IVR" in check({"n": 1000, "ivr": 0.5, "n_purchased": 0, "fpr": 0.0}, cal, s)
    assert check({"n": 50, "ivr": 1.0, "n_purchased": 0, "fpr": 0.0}, cal, s) == ""  # too few to tell
    assert "live FPR" in check({"n": 1000, "ivr": 0.1, "n_purchased": 40, "fpr": 0.1}, cal, s)
    assert check({"n": 1000, "ivr": 0.1, "n_purchased": 10, "fpr": 0.5}, cal, s) == ""
    assert "live IVR" in check({"n": 1000, "ivr": 0.6, "n_purchased": 0, "fpr": 0.0}, {}, s)  # no calibration
    assert check({"n": 1000, "ivr": 0.4, "n_purchased": 0, "fpr": 0.0}, {}, s) == ""


@pytest.mark.integration
def test_a_faulty_model_live_is_rolled_back_automatically(kenv: Any) -> None:
    """A model that invalidates every click forced live: the monitor rolls back to the stable one, the worker
    follows, and billing's latest view shows the stable model's decisions for the clicks after it."""
    from stream import billing, cache
    from tests.stream import kafka_helpers as K
    from tests.stream.helpers import traffic
    from tests.stream.test_faults import _profiles, _worker, all_decided, paced, wait_for

    s = kenv.settings.model_copy(update={"monitor_window_s": 20.0, "monitor_min_decisions": 300})
    toymodel.build_registry(s.registry_path, version="toy-good", threshold=0.7)
    faulty = toymodel.build(kenv.workdir / "faulty", version="toy-faulty", threshold=0.0)  # all invalid
    clicks = traffic(20_000, seed=41)
    cache.load(s, _profiles(clicks))
    log = kenv.workdir / "w.log"
    w = _worker(kenv, log)
    mon = Monitor(s)
    stop = asyncio.Event()
    loop = asyncio.new_event_loop()
    th = threading.Thread(target=loop.run_until_complete, args=(mon.run(stop),), daemon=True)
    th.start()
    try:
        with paced(s, kenv.topics.clicks, clicks, 800):
            wait_for(lambda: sum(asyncio.run(K.end_offsets(s, kenv.topics.decisions)).values()) > 1500, 240,
                     "decisions by the good model", [w])
            forced_at = int(time.time() * 1000)
            registry.publish(faulty, s)  # forced live: no guardrail on this path
            wait_for(lambda: registry.active_version(s) == "toy-good", 60, "the automatic rollback", [w])
            rolled_at = int(time.time() * 1000)
        wait_for(all_decided(kenv, {c.click_id for c in clicks}, 0), 300, "every click decided", [w])
    finally:
        loop.call_soon_threadsafe(stop.set)
        th.join(30)
        K.stop(w)
    print(f"faulty model forced live; rolled back after {(rolled_at - forced_at) / 1000:.1f} s")
    assert rolled_at - forced_at < 20_000 + 15_000  # within the window (20 s) plus the swap and the tick
    ds = [decode_decision(m.value) for msgs in asyncio.run(K.read_partitions(s, kenv.topics.decisions, 30.0)).values()
          for m in msgs]
    assert any(d.model_version == "toy-faulty" for d in ds)  # it did go live
    led = billing.ledger_of(ds)  # billing's view: the latest revision per click
    late = [d for d in led.latest.values() if d.decided_at > rolled_at + 3_000]
    assert len(late) > 1000 and all(d.model_version == "toy-good" for d in late)
    hist = registry.history(s)  # recorded in the registry's history
    assert any(h["action"] == "rollback" and h["reason"].startswith("automatic: live IVR") for h in hist), hist
