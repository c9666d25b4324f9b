"""The detector worker against the real broker and Redis (see tests/conftest.py for ``kenv``)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import defaultdict
from typing import Any

import numpy as np
import orjson
import pytest

from schemas.events import Click, decode_decision
from slidr.settings import Settings
from slidr.topics import changelog_topic
from stream import cache, toymodel
from stream import features as F
from stream.app import USERS_TABLE, read_feature_log
from tests.stream import kafka_helpers as K
from tests.stream.helpers import click, traffic
from tests.stream.test_event_time import event_time_order, lagging

pytestmark = pytest.mark.integration

N_CLICKS = int(os.environ.get("SLIDR_TEST_CLICKS", "20000"))
N_JUNK = N_CLICKS // 100
JUNK = [b"not json", b"{}", b'{"click_id": 5}', b"[1,2]", b""]


def _junk(n: int) -> list[bytes]:
    return [JUNK[i % len(JUNK)] + (b" " * (i // len(JUNK)) if i % len(JUNK) == 0 else b"") for i in range(n)]


def _profiles(clicks: list[Click]) -> dict[str, bytes]:
    """Profiles for half the customers and a datacenter flag on a few ranges."""
    cust = sorted({c.customer_id for c in clicks if c.customer_id})
    ips = sorted({F.ip_range_key(c.ip)[4:] for c in clicks})
    return F.build_profiles(
        [{"customer_id": k, "rfm_score": (i % 10) / 10, "account_age_days": 30 + i} for i, k in enumerate(cust)
         if i % 2 == 0],
        [{"prefix": p, "datacenter": i % 3 == 0} for i, p in enumerate(ips)],
    )


def _setup(kenv: Any) -> tuple[list[Click], dict[str, bytes]]:
    s = kenv.settings
    toymodel.build_registry(s.registry_path, version="toy-it", threshold=0.7)
    clicks = traffic(N_CLICKS, seed=11)
    profiles = _profiles(clicks)
    cache.load(s, profiles)
    return clicks, profiles


def counted_order(feature_log: dict[int, list[Any]]) -> list[list[str]]:
    """Per by-ip partition, the click ids in the order the IP stage counted them: its feature log's order (first
    record of each click; the IP stage releases clicks in event-time order, a late click when it comes)."""
    chains = []
    for msgs in feature_log.values():
        seen: set[str] = set()
        chain = []
        for m in msgs:
            for rec in read_feature_log(m.value):
                if rec["click_id"] not in seen:
                    seen.add(rec["click_id"])
                    chain.append(rec["click_id"])
        chains.append(chain)
    return chains


def reference_features(clicks: list[Click], feature_log: dict[int, list[Any]], profiles: dict[str, bytes],
                       shards: int = F.COMBO_SHARDS) -> dict[str, np.ndarray]:
    """Each click's features computed offline by the stream's own functions: user features over each user's
    clicks in produced order (they were keyed by user key), IP features over each IP's clicks in the order the IP
    stage counted them. (No single arrival order need explain both: two late clicks can make the two orders
    cross, so this does not go through ``featurize``'s one sequence.) ``shards``: the worker's SLIDR_COMBO_SHARDS."""
    by_id = {c.click_id: c for c in clicks}
    users: dict[str, Any] = {}
    uf: dict[str, list[float]] = {}
    for c in clicks:
        users[c.user_key], uf[c.click_id] = F.update_user(users.get(c.user_key), c)
    ips: dict[str, Any] = {}
    ipf: dict[str, list[float]] = {}
    combos: dict[str, Any] = {}
    xf: dict[str, list[float]] = {}
    for chain in counted_order(feature_log):
        for cid in chain:
            c = by_id[cid]
            ips[c.ip_key], ipf[cid] = F.update_ip(ips.get(c.ip_key), c)
            k = F.combo_key(c, shards)
            combos[k], xf[cid] = F.update_combo(combos.get(k), c, None, *F.is_new(uf[cid], ipf[cid]))
    get = profiles.get
    return {cid: np.asarray(F.assemble(by_id[cid], uf[cid], ipf[cid], xf[cid], F.lookup_profile(by_id[cid], get)),
                            dtype=np.float32) for cid in ipf}


def _wait_decided(kenv: Any, n: int, timeout_s: float, procs: list[Any] = ()) -> dict[str, list[Any]]:  # type: ignore[assignment]
    t = kenv.topics

    def done(rec: dict[str, list[Any]]) -> bool:
        return len({m.key for m in rec[t.decisions]}) >= n and len(rec[t.dead_letters]) >= N_JUNK

    def tick() -> None:
        for p in procs:
            assert p.poll() is None, f"worker died with {p.returncode}; see {kenv.workdir}"

    return asyncio.run(K.read_until(kenv.settings, [t.decisions, t.dead_letters], done, timeout_s,
                                    tick))


def _logged_features(s: Settings, topic: str, spec: str = F.FEATURE_SPEC_HASH,
                     ) -> tuple[dict[int, list[Any]], dict[str, np.ndarray]]:
    """The whole feature log (``topic``), read once the worker has stopped, and each click's first logged vector.
    (Not what was read while waiting for the decisions: a batch's feature-log records are sent after its
    decisions, so the last few can arrive after the wait ended.) Every record carries ``spec``."""
    log = asyncio.run(K.read_partitions(s, topic))
    got: dict[str, np.ndarray] = {}
    for msgs in log.values():
        for m in msgs:
            for r in read_feature_log(m.value):
                assert r["feature_spec_hash"] == spec and r["model_version"] == "toy-it"
                got.setdefault(r["click_id"], np.asarray(r["features"], dtype=np.float32))
    return log, got


def _check_features(s: Settings, topic: str, clicks: list[Click], profiles: dict[str, bytes],
                    spec: str = F.FEATURE_SPEC_HASH, shards: int = F.COMBO_SHARDS,
                    ) -> tuple[dict[int, list[Any]], dict[str, np.ndarray]]:
    """Every click's logged features equal the offline functions' (``shards``: the worker's SLIDR_COMBO_SHARDS),
    bit for bit; returns the feature log and the offline features."""
    log, got = _logged_features(s, topic, spec)
    want = reference_features(clicks, log, profiles, shards)
    assert set(got) == set(want) == {c.click_id for c in clicks}
    bad = [k for k in want if not np.array_equal(got[k], want[k])]
    assert not bad, f"{len(bad)} clicks differ, e.g. {bad[0]}: {got[bad[0]]} vs {want[bad[0]]}"
    return log, want


def test_every_click_decided_once_and_features_match_offline(kenv: Any) -> None:
    clicks, profiles = _setup(kenv)
    w = K.start_worker(kenv.settings, kenv.workdir / "w0", kenv.workdir / "w0.log")
    try:
        asyncio.run(K.produce(kenv.settings, kenv.topics.clicks, clicks, _junk(N_JUNK)))
        t0 = time.monotonic()
        rec = _wait_decided(kenv, N_CLICKS, 240, [w])
        took = time.monotonic() - t0
    finally:
        K.stop(w)
    decisions = [decode_decision(m.value) for m in rec[kenv.topics.decisions]]
    ids = [d.click_id for d in decisions]
    assert len(ids) == len(set(ids)) == N_CLICKS, (len(ids), len(set(ids)))
    assert set(ids) == {c.click_id for c in clicks}
    assert len(rec[kenv.topics.dead_letters]) == N_JUNK
    dl = orjson.loads(rec[kenv.topics.dead_letters][0].value)
    assert dl["source_topic"] == kenv.topics.clicks and dl["error"]
    assert 0 < sum(not d.valid for d in decisions) < N_CLICKS  # the toy model flags the hot bots only
    print(f"{N_CLICKS} clicks decided in {took:.1f} s")
    _check_features(kenv.settings, kenv.topics.feature_log, clicks, profiles)


def test_a_worker_set_up_with_12_shards_runs_3_partitions_and_matches_offline(kenv: Any) -> None:
    """SLIDR_COMBO_SHARDS=12 for the model and the worker (a deployment that needs more than 4 workers): on 3
    partitions, which 4 shards refuse, every click is decided once and its features, user agent x ad counters
    included, equal the offline functions' with 12 shards, bit for bit."""
    import subprocess
    import sys

    from slidr.services import create_topics
    from slidr.topics import Topics

    code = "from stream.features import FEATURE_SPEC_HASH as H; print(H)"
    spec12 = subprocess.run([sys.executable, "-c", code], env={**os.environ, "SLIDR_COMBO_SHARDS": "12"},
                            capture_output=True, check=True, timeout=120).stdout.split()[-1].decode()
    assert spec12 != F.FEATURE_SPEC_HASH
    prefix = f"{kenv.prefix}-s12"  # (dropped with the test's own topics: same prefix)
    s = kenv.settings.model_copy(update={"topic_prefix": prefix, "worker_id": f"{prefix}-group", "partitions": 3,
                                         "combo_shards": 12, "redis_key_prefix": prefix})
    t = Topics(prefix)
    create_topics(s)
    toymodel.build_registry(s.registry_path, version="toy-it", threshold=0.7, feature_spec_hash=spec12,
                            combo_shards=12)
    clicks = traffic(N_CLICKS // 4, seed=11)
    profiles = _profiles(clicks)
    cache.load(s, profiles)
    w = K.start_worker(s, kenv.workdir / "w12", kenv.workdir / "w12.log")
    try:
        asyncio.run(K.produce(s, t.clicks, clicks))

        def tick() -> None:
            assert w.poll() is None, f"worker died with {w.returncode}; see {kenv.workdir / 'w12.log'}"

        rec = asyncio.run(K.read_until(s, [t.decisions], lambda r: len({m.key for m in r[t.decisions]}) >= len(
            clicks), 240, tick))
    finally:
        K.stop(w)
    ids = [decode_decision(m.value).click_id for m in rec[t.decisions]]
    assert len(ids) == len(set(ids)) == len(clicks) and set(ids) == {c.click_id for c in clicks}
    log, want = _check_features(s, t.feature_log, clicks, profiles, spec=spec12, shards=12)
    assert len(log) == 3
    combo = [i for i, n in enumerate(F.FEATURE_NAMES) if n.startswith("ua_ad_")]
    four = reference_features(clicks, log, profiles, shards=4)  # 12 shards' counters are not 4 shards': the
    assert combo and any(not np.array_equal(want[k][combo], four[k][combo]) for k in want)  # check saw the setting


def test_a_partition_lagging_half_an_hour_changes_no_features(kenv: Any) -> None:
    """Issue 16, item 2, through the real worker: clicks partition 0 carries event times 30 min behind the others
    all along; every click's features equal ``featurize`` in global event-time order, bit for bit (the IP stage
    holds clicks until the watermark passes them)."""
    s = kenv.settings
    toymodel.build_registry(s.registry_path, version="toy-it", threshold=0.7)
    clicks = lagging(traffic(4000, seed=12, users=150, ips=15, rate_ms=1000, late_frac=0.0), s.partitions,
                     30 * 60_000)
    profiles = _profiles(clicks)
    cache.load(s, profiles)
    w = K.start_worker(s, kenv.workdir / "w0", kenv.workdir / "w0.log")
    try:
        asyncio.run(K.produce(s, kenv.topics.clicks, clicks))
        asyncio.run(K.read_until(s, [kenv.topics.decisions],
                                 lambda r: len({m.key for m in r[kenv.topics.decisions]}) >= len(clicks),
                                 240, lambda: None if w.poll() is None else pytest.fail("worker died")))
    finally:
        K.stop(w)
    order = event_time_order(clicks, s.partitions)
    X = F.featurize(order, profiles)
    want = {c.click_id: X[i] for i, c in enumerate(order)}
    _, got = _logged_features(kenv.settings, kenv.topics.feature_log)
    assert set(got) == set(want)
    bad = [k for k in want if not np.array_equal(got[k], want[k])]
    assert not bad, f"{len(bad)} of {len(want)} clicks differ, e.g. {bad[0]}: {got[bad[0]]} vs {want[bad[0]]}"


def _table_snapshot(kenv: Any) -> dict[bytes, Any]:
    """Latest value per key of the users table's changelog."""
    parts = asyncio.run(K.read_partitions(kenv.settings, changelog_topic(kenv.settings, USERS_TABLE)))
    out: dict[bytes, Any] = {}
    for msgs in parts.values():
        for m in msgs:
            out[m.key] = _strip(orjson.loads(m.value)) if m.value is not None else None
    return out


def _strip(st: dict[str, Any]) -> dict[str, Any]:
    """State minus the redelivery bookkeeping (stream positions, which offline runs have not)."""
    return {k: v for k, v in st.items() if k not in ("q", "src", "r", "ids")}


def _offline_users(clicks: list[Click]) -> dict[bytes, Any]:
    users: dict[str, Any] = {}
    for c in clicks:
        users[c.user_key], _ = F.update_user(users.get(c.user_key), c)
    return {k.encode(): _strip(orjson.loads(orjson.dumps(v))) for k, v in users.items()}


def test_sigkill_halfway_then_restart_decides_everything(kenv: Any) -> None:
    clicks, _ = _setup(kenv)
    log = kenv.workdir / "w.log"
    w = K.start_worker(kenv.settings, kenv.workdir / "w0", log)
    try:
        asyncio.run(K.produce(kenv.settings, kenv.topics.clicks, clicks, _junk(N_JUNK)))
        # wait until about half is decided, then SIGKILL (no shutdown, no final commit)
        asyncio.run(K.read_until(kenv.settings, [kenv.topics.decisions],
                                 lambda r: len(r[kenv.topics.decisions]) >= N_CLICKS // 2, 240))
        os.kill(w.pid, signal.SIGKILL)
        w.wait()
        w = K.start_worker(kenv.settings, kenv.workdir / "w0", log)  # same state folder, as a restart would
        rec = _wait_decided(kenv, N_CLICKS, 240, [w])
    finally:
        K.stop(w)
    ids = {m.key.decode() for m in rec[kenv.topics.decisions]}
    assert ids == {c.click_id for c in clicks}
    # counters after recovery equal an uninterrupted run's (redelivered clicks did not count twice)
    assert _table_snapshot(kenv) == _offline_users(clicks)


def test_two_workers_split_partitions_and_decide_everything(kenv: Any) -> None:
    clicks, _ = _setup(kenv)
    ws = [K.start_worker(kenv.settings, kenv.workdir / f"w{i}", kenv.workdir / f"w{i}.log") for i in range(2)]
    try:
        time.sleep(8)  # let both join the group before the traffic starts
        asyncio.run(K.produce(kenv.settings, kenv.topics.clicks, clicks, _junk(N_JUNK)))
        rec = _wait_decided(kenv, N_CLICKS, 240, ws)
    finally:
        for w in ws:
            K.stop(w)
    per_click: dict[str, int] = defaultdict(int)
    for m in rec[kenv.topics.decisions]:
        per_click[m.key.decode()] += 1
    assert set(per_click) == {c.click_id for c in clicks}
    assert max(per_click.values()) == 1, "a click was decided twice"
    # both workers did part of the work: each one's state folder holds table data
    for i in range(2):
        assert any((kenv.workdir / f"w{i}").rglob("*.sst")) or any((kenv.workdir / f"w{i}").rglob("*.log")), i


def _changelog_latest(kenv: Any, table: str) -> dict[bytes, bytes | None]:
    parts = asyncio.run(K.read_partitions(kenv.settings, changelog_topic(kenv.settings, table)))
    return {m.key: m.value for msgs in parts.values() for m in msgs}


def test_idle_keys_are_deleted_once_event_time_passes_their_ttl(kenv: Any) -> None:
    """Users and IPs idle for longer than TTL + grace (event time) are deleted online: a tombstone in the
    changelog (the local store deletes them in the same write batch); keys still in use stay."""
    s = kenv.settings.model_copy(update={"sweep_keys_per_click": 2.0})  # whole rounds within the test's clicks
    toymodel.build_registry(s.registry_path, version="toy-it")
    old = traffic(1500, seed=3)  # about 75 s of traffic from T0
    later = old[-1].ts + F.TTL_MS + F.EXPIRY_GRACE_MS + 60_000
    new = [click(10_000 + i, later + 40 * i, ip=f"192.168.{i % 5}.{i % 40}", session=f"late{i % 97}")
           for i in range(1500)]
    w = K.start_worker(s, kenv.workdir / "w0", kenv.workdir / "w0.log")
    try:
        asyncio.run(K.produce(s, kenv.topics.clicks, old))
        asyncio.run(K.read_until(s, [kenv.topics.decisions], lambda r: len(r[kenv.topics.decisions]) >= len(old), 240))
        asyncio.run(K.produce(s, kenv.topics.clicks, new))
        n = len(old) + len(new)
        asyncio.run(K.read_until(s, [kenv.topics.decisions], lambda r: len(r[kenv.topics.decisions]) >= n, 240))
        time.sleep(2)  # the last flush's changelog records
    finally:
        K.stop(w)
    for table, key in ((USERS_TABLE, lambda c: c.user_key), ("ips", lambda c: c.ip)):
        latest = _changelog_latest(kenv, table)
        old_keys = {key(c).encode() for c in old} - {key(c).encode() for c in new}
        new_keys = {key(c).encode() for c in new}
        assert old_keys and all(k in latest for k in old_keys)
        assert [k for k in old_keys if latest[k] is not None] == [], f"{table}: idle keys not deleted"
        assert all(latest.get(k) is not None for k in new_keys), f"{table}: a live key was deleted"


def test_a_worker_joining_mid_traffic_loses_and_double_counts_nothing(kenv: Any) -> None:
    """A rebalance while clicks flow: every click is decided (at least once: a click in flight at the
    rebalance may be decided by both workers) and the users table's counters equal an uninterrupted run."""
    clicks, _ = _setup(kenv)
    ws = [K.start_worker(kenv.settings, kenv.workdir / "w0", kenv.workdir / "w0.log")]
    try:
        time.sleep(5)  # the first worker owns every partition

        joined_at: list[float] = []

        async def paced() -> None:
            for i in range(0, len(clicks), 500):  # about 1,500 clicks/s
                await K.produce(kenv.settings, kenv.topics.clicks, clicks[i:i + 500])
                await asyncio.sleep(0.3)
                if i == 3000:  # a second worker joins: partitions move while clicks flow
                    ws.append(K.start_worker(kenv.settings, kenv.workdir / "w1", kenv.workdir / "w1.log"))
                    joined_at.append(time.monotonic())

        asyncio.run(paced())
        # it starts and joins in a few seconds; the clicks went on for longer than that after it started
        assert N_CLICKS < 20_000 or time.monotonic() - joined_at[0] > 8
        rec = asyncio.run(K.read_until(kenv.settings, [kenv.topics.decisions],
                                       lambda r: len({m.key for m in r[kenv.topics.decisions]}) >= N_CLICKS, 240))
    finally:
        for w in ws:
            K.stop(w)
    assert len(ws) == 2
    assert any((kenv.workdir / "w1").rglob("*.log")), "the second worker never took partitions"
    assert {m.key.decode() for m in rec[kenv.topics.decisions]} == {c.click_id for c in clicks}
    assert _table_snapshot(kenv) == _offline_users(clicks)
