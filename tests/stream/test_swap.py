"""Hot swap (issue 9): a running worker follows the registry's ACTIVE model without a restart."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from models import registry
from stream import toymodel
from tests.stream import kafka_helpers as K
from tests.stream.helpers import traffic
from tests.stream.test_faults import _profiles, _worker, all_decided, paced, wait_for

pytestmark = pytest.mark.integration


def _decisions(kenv: Any) -> list[dict[str, Any]]:
    parts = asyncio.run(K.read_partitions(kenv.settings, kenv.topics.decisions, 30.0))
    return [orjson.loads(m.value) for msgs in parts.values() for m in msgs]


def _first_at(ds: list[dict[str, Any]], version: str, after_ms: int) -> int:
    return min(d["decided_at"] for d in ds if d["model_version"] == version and d["decided_at"] >= after_ms)


def test_promote_rollback_and_a_tampered_model_while_clicks_flow(kenv: Any) -> None:
    from stream import cache

    s = kenv.settings
    toymodel.build_registry(s.registry_path, version="toy-a", threshold=0.7)
    clicks = traffic(24_000, seed=31)
    cache.load(s, _profiles(clicks))
    b = toymodel.build(kenv.workdir / "build-b", version="toy-b", threshold=0.2)
    bad = toymodel.build(kenv.workdir / "build-c", version="toy-c", threshold=0.5)
    log = kenv.workdir / "w.log"
    w = _worker(kenv, log)
    switches: dict[str, int] = {}
    try:
        with paced(s, kenv.topics.clicks, clicks, 1000):
            wait_for(lambda: sum(asyncio.run(K.end_offsets(s, kenv.topics.decisions)).values()) > 2000, 240,
                     "decisions by toy-a", [w])
            switches["promote"] = int(time.time() * 1000)
            registry.publish(b, s)  # ACTIVE -> toy-b
            time.sleep(6)  # the clicks keep flowing; toy-b must be live within 5 s of the promote
            switches["rollback"] = int(time.time() * 1000)
            registry.rollback(s)  # ACTIVE -> STABLE = toy-a
            time.sleep(6)
            registry.publish(bad, s, activate=False)
            (s.registry_path / "toy-c" / "model.onnx").write_bytes(b"tampered")
            switches["tampered"] = int(time.time() * 1000)
            (s.registry_path / "ACTIVE").write_text("toy-c\n")  # forced past the registry's own checks
        wait_for(all_decided(kenv, {c.click_id for c in clicks}, 0), 300, "every click decided", [w])
        assert w.poll() is None
    finally:
        K.stop(w)
    ds = _decisions(kenv)
    per_click: dict[str, set[str]] = {}
    for d in ds:
        per_click.setdefault(d["click_id"], set()).add(d["model_version"])
    assert set(per_click) == {c.click_id for c in clicks}
    assert all(len(v) == 1 for v in per_click.values()), "a click decided by two versions in one revision"
    assert len(ds) == len(clicks)  # none decided twice
    to_b = _first_at(ds, "toy-b", switches["promote"]) - switches["promote"]
    back = _first_at(ds, "toy-a", switches["rollback"]) - switches["rollback"]
    print(f"swap: promote -> first toy-b decision {to_b} ms, rollback -> first toy-a decision {back} ms")
    assert to_b <= 5000 and back <= 5000
    # after each switch settled, only the new version decides
    assert all(d["model_version"] == "toy-b" for d in ds
               if switches["promote"] + to_b + 1000 < d["decided_at"] < switches["rollback"])
    assert all(d["model_version"] == "toy-a" for d in ds if d["decided_at"] > switches["rollback"] + back + 1000)
    assert not any(d["model_version"] == "toy-c" for d in ds)
    text = log.read_text()
    assert "refusing model toy-c" in text and "model.onnx does not match" in text
