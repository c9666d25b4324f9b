"""Fault tests against the real broker and Redis (loopback, bounded in time): every click accounted for.

Each test sends clicks (and faults) while a real ``slidr worker`` runs, waits until every click is decided, then
prints and checks its accounting: clicks in = unique clicks decided + dead letters; duplicates (a click decided
more than once) counted, and every repeated decision equal to the first (all fields but ``decided_at``); the
users table's counters equal an uninterrupted offline run.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest

from schemas.events import Click
from slidr import services as svc
from stream import cache, stages, toymodel
from stream.state import RECENT_IDS
from tests.conftest import FAULT_ACCOUNTS
from tests.stream import kafka_helpers as K
from tests.stream.helpers import click, traffic
from tests.stream.test_worker_integration import _offline_users, _profiles, _table_snapshot

pytestmark = pytest.mark.integration


# --- accounting --------------------------------------------------------------------------------------------
def _decisions(kenv: Any) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for msgs in asyncio.run(K.read_partitions(kenv.settings, kenv.topics.decisions, 30.0)).values():
        for m in msgs:
            out[m.key.decode()].append(orjson.loads(m.value))
    return out


def _dead_letters(kenv: Any) -> list[dict[str, Any]]:
    s = kenv.settings.model_copy(update={"partitions": 1})
    return [orjson.loads(m.value) for m in asyncio.run(K.read_partitions(s, kenv.topics.dead_letters, 30.0))[0]]


def account(kenv: Any, clicks: list[Click], n_bad: int, what: str, *,
            equal_repeats: bool = True) -> dict[str, Any]:
    """Check and print the accounting of a fault test."""
    dec = _decisions(kenv)
    dead = _dead_letters(kenv)
    want = {c.click_id for c in clicks}
    lost = want - set(dec)
    dups = sum(len(v) - 1 for v in dec.values())

    def same(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if k != "decided_at"}

    conflicting = sorted(k for k, v in dec.items() if any(same(d) != same(v[0]) for d in v[1:]))
    acc = {"what": what, "clicks_in": len(clicks) + n_bad, "clicks": len(clicks), "bad": n_bad,
           "decided_unique": len(dec), "dead_letters": len(dead), "lost": len(lost), "duplicates": dups,
           "conflicting_duplicates": len(conflicting), "unknown_decided": len(set(dec) - want)}
    print("accounting:", orjson.dumps(acc).decode())
    FAULT_ACCOUNTS.append(orjson.dumps(acc).decode())
    assert not lost, f"{len(lost)} clicks never decided, e.g. {sorted(lost)[:3]}"
    assert acc["unknown_decided"] == 0
    assert len(dec) + len(dead) == len(clicks) + n_bad, acc
    if equal_repeats:
        assert not conflicting, f"repeated decisions differ, e.g. {conflicting[0]}: {dec[conflicting[0]]}"
    return acc


# --- traffic -----------------------------------------------------------------------------------------------
def _setup(kenv: Any, n: int, seed: int) -> list[Click]:
    s = kenv.settings
    toymodel.build_registry(s.registry_path, version="toy-it", threshold=0.7)
    clicks = traffic(n, seed=seed)
    cache.load(s, _profiles(clicks))
    return clicks


@contextmanager
def paced(s: Any, topic: str, clicks: list[Click], per_s: float) -> Iterator[threading.Event]:
    """Produce ``clicks`` at about ``per_s`` in a background thread; the event is set when all are acked."""
    done = threading.Event()
    err: list[BaseException] = []

    def go() -> None:
        async def run() -> None:
            step = max(1, int(per_s / 10))
            for i in range(0, len(clicks), step):
                t0 = time.monotonic()
                for attempt in range(60):  # the broker may be down for a while (the broker test)
                    try:
                        await K.produce(s, topic, clicks[i:i + step])
                        break
                    except Exception:
                        if attempt == 59:
                            raise
                        await asyncio.sleep(1.0)
                await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - t0)))
        try:
            asyncio.run(run())
        except BaseException as e:
            err.append(e)
        finally:
            done.set()

    th = threading.Thread(target=go, daemon=True)
    th.start()
    try:
        yield done
    finally:
        th.join(600)
        assert not err, err


def _n_decided(kenv: Any) -> int:
    ends = asyncio.run(K.end_offsets(kenv.settings, kenv.topics.decisions))
    return sum(ends.values())


def wait_for(cond: Callable[[], bool], timeout_s: float, what: str, procs: list[Any] = ()) -> None:  # type: ignore[assignment]
    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        if cond():
            return
        for p in procs:
            assert p.poll() is None or p.returncode == 70, f"worker died with {p.returncode}"
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def supervised(kenv: Any, log: Path, ws: list[Any], cond: Callable[[], bool], timeout_s: float, what: str) -> int:
    """``wait_for(cond)`` while a supervisor keeps ``ws[0]`` running: a worker that stops itself (exit 70: its
    watchdog found it stuck, issue 12's stall) is restarted once the group has dropped it, as Kubernetes' back-off
    would. Returns the number of restarts (printed)."""
    restarts = 0
    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        if cond():
            print(f"supervised: {restarts} restart(s) after the worker stopped itself")
            return restarts
        rc = ws[0].poll()
        assert rc is None or rc == 70, f"worker died with {rc}"
        if rc == 70:
            wait_for(lambda: asyncio.run(K.group_members(kenv.settings, kenv.group)) == 0, 60,
                     "the stopped worker to leave the group")
            ws[0] = _worker(kenv, log)
            restarts += 1
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"
    raise AssertionError(f"timed out waiting for {what} ({restarts} restart(s)); the worker's log ends:\n{tail}")


def restart_once_dropped(kenv: Any, log: Path, clicks: list[Click]) -> Any:
    """Restart a worker that stopped itself once the group has dropped it, and supervise it until every click is
    decided; the last worker process (stopped by the caller)."""
    wait_for(lambda: asyncio.run(K.group_members(kenv.settings, kenv.group)) == 0, 120,
             "the stopped worker's session to expire")
    ws = [_worker(kenv, log)]
    try:
        supervised(kenv, log, ws, all_decided(kenv, {c.click_id for c in clicks}, 0), 360, "every click decided")
    finally:
        K.stop(ws[0])
    return ws[0]


def all_decided(kenv: Any, ids: set[str], n_dead: int) -> Callable[[], bool]:
    def cond() -> bool:
        r = asyncio.run(K.read_until(kenv.settings, [kenv.topics.decisions, kenv.topics.dead_letters],
                                     lambda rec: len({m.key for m in rec[kenv.topics.decisions]}) >= len(ids)
                                     and len(rec[kenv.topics.dead_letters]) >= n_dead, 5.0))
        return {m.key.decode() for m in r[kenv.topics.decisions]} >= ids and len(
            r[kenv.topics.dead_letters]) >= n_dead
    return cond


def _worker(kenv: Any, log: Path, env: dict[str, str] | None = None) -> Any:
    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        return K.start_worker(kenv.settings, kenv.workdir / "w0", log)
    finally:
        os.environ.clear()
        os.environ.update(old)


def _check_counters(kenv: Any, clicks: list[Click]) -> None:
    assert _table_snapshot(kenv) == _offline_users(clicks), "users counters differ from an uninterrupted run"


# --- fuzzing -----------------------------------------------------------------------------------------------
def fuzz_messages(good: list[Click], n: int, seed: int = 5) -> tuple[list[tuple[bytes | None, bytes]], int]:
    """``n`` bad messages of many kinds, among them exact resends of the last of the ``good`` clicks (duplicate
    click ids, a producer's retry: keyed like the original, or not). Returns (messages, how many are resends).
    A resend is recognised while its key has had fewer than ``RECENT_IDS`` clicks since the original (the
    design's dedupe window): the resent clicks are picked within it."""
    r = random.Random(seed)
    after: dict[str, int] = defaultdict(int)
    recent: list[Click] = []
    for c in reversed(good):
        if after[c.user_key] < RECENT_IDS - 1:
            recent.append(c)
        after[c.user_key] += 1
    base = orjson.loads(good[0].to_json())
    kinds: list[Callable[[], bytes]] = [
        lambda: r.randbytes(r.randint(0, 300)),
        lambda: orjson.dumps({**base, "ts": r.choice(["x", 1.5, None, -5, 10**15, 2**63, True])}),
        # inside the schema's bounds but out of time: far future (2099), far past (3 days behind the traffic)
        lambda: orjson.dumps({**base, "click_id": f"f{r.randrange(10**9)}",
                              "ts": r.choice([4_070_908_800_000, base["ts"] - 3 * 86_400_000])}),
        lambda: orjson.dumps({**base, "ip": r.choice([5, "999.1.1.1", "", "a" * 46, "1.2.3", None])}),
        lambda: orjson.dumps({k: v for k, v in base.items() if k != drop}) if (
            drop := r.choice(["click_id", "ts", "ip", "platform"])) else b"",
        lambda: orjson.dumps({**base, "extra_field": 1}),
        lambda: orjson.dumps({**base, "user_agent": "A" * r.randint(5000, 20000)}),
        lambda: orjson.dumps({**base, "platform": r.choice(["tv", 3, None])}),
        lambda: orjson.dumps({**base, "logged_in": True, "customer_id": None}),
        lambda: orjson.dumps({"v": 1, "purchase_id": "p1", "click_id": "c1", "ts": base["ts"], "amount": 3.0}),
        lambda: orjson.dumps([base]),
        lambda: b"\xff\xfe" + orjson.dumps(base),
        lambda: orjson.dumps({**base, "click_id": "x" * 500}),
        lambda: orjson.dumps({**base, "tz_offset_min": 10_000}),
        lambda: b'{"cpc": NaN}',
    ]
    msgs: list[tuple[bytes | None, bytes]] = []
    resends = 0
    for i in range(n):
        if i % 20 == 0:  # an exact resend of a good click, keyed by its user key or by anything else
            c = r.choice(recent)
            msgs.append((r.choice([c.user_key.encode(), b"retry"]), c.to_json()))
            resends += 1
        else:
            key = r.choice([None, b"junk", r.randbytes(8)])
            msgs.append((key, r.choice(kinds)()))
    return msgs, resends


def _special_good(t0: int) -> list[Click]:
    """Good clicks the fuzz sends beside the traffic: textual variants of one IPv6 and one IPv4 address (each is
    one IP key), and clicks at the schema's maximum field sizes."""
    variants = ["2001:db8::1", "2001:DB8:0:0::1", "2001:0db8::0:1", "2001:db8::abcd", "203.0.113.45",
                "::ffff:203.0.113.45"]
    out = [click(50_000 + i, t0 + i, ip=ip, session=f"v6-{i}") for i, ip in enumerate(variants * 5)]
    return out + [_max_click(i, t0 + 100 + i) for i in range(200)]


def test_fuzzed_clicks_topic_dead_letters_every_bad_message(kenv: Any) -> None:
    traffic_clicks = _setup(kenv, 6000, seed=21)
    special = _special_good(traffic_clicks[2999].ts)
    good = traffic_clicks[:3000] + special + traffic_clicks[3000:]
    n_first = 3000 + len(special)
    bad, resends = fuzz_messages(good[:n_first], 10_500)
    w = _worker(kenv, kenv.workdir / "w0.log")
    try:
        asyncio.run(K.produce(kenv.settings, kenv.topics.clicks, good[:n_first]))
        # the originals of the resends decided first (a resend keyed otherwise goes through by-user, which the
        # user stage may read before it reaches the original in the clicks topic)
        wait_for(all_decided(kenv, {c.click_id for c in good[:n_first]}, 0), 240, "the originals decided", [w])
        asyncio.run(K.produce_raw(kenv.settings, kenv.topics.clicks, bad))
        # and the resends handled before their keys click again (a resend keyed otherwise comes round through
        # by-user, possibly after later clicks of its key: past the dedupe window, see fuzz_messages)
        wait_for(all_decided(kenv, set(), len(bad)), 240, "the bad messages dead-lettered", [w])
        asyncio.run(K.produce(kenv.settings, kenv.topics.clicks, good[n_first:]))
        wait_for(all_decided(kenv, {c.click_id for c in good}, len(bad)), 300, "every click decided", [w])
        assert w.poll() is None, "the worker stopped"
    finally:
        K.stop(w)
    acc = account(kenv, good, len(bad), "fuzz")
    dead = _dead_letters(kenv)
    assert all(d["error"] and isinstance(d["field"], str) for d in dead)  # field "" = the payload as a whole
    dup = [d for d in dead if d["field"] == "click_id" and d["error"].startswith("duplicate")]
    assert len(dup) == resends and acc["duplicates"] == 0
    out_of_time = [d for d in dead if d["field"] == "ts" and ("ahead of" in d["error"] or "behind" in d["error"])]
    assert len(out_of_time) > 300, len(out_of_time)
    # the IP variants were counted under two IP keys (the feature log's ip_clicks_24h reached 15 for each)
    from stream import features as F
    from stream.stages import read_feature_log

    rows = {r["click_id"]: r["features"] for msgs in asyncio.run(K.read_partitions(
        kenv.settings, kenv.topics.feature_log)).values() for m in msgs for r in read_feature_log(m.value)}
    col = F.FEATURE_NAMES.index("ip_clicks_24h")
    assert max(rows[c.click_id][col] for c in special[:30] if ":" in c.ip and "ffff" not in c.ip) == 20.0
    assert max(rows[c.click_id][col] for c in special[:30] if "203.0.113.45" in c.ip) == 10.0
    _check_counters(kenv, good)  # the resends and the junk changed no counter


# --- crashes -----------------------------------------------------------------------------------------------
def test_five_sigkills_under_load(kenv: Any) -> None:
    clicks = _setup(kenv, 12_000, seed=22)
    log = kenv.workdir / "w.log"
    w = _worker(kenv, log)
    kills = 0
    try:
        with paced(kenv.settings, kenv.topics.clicks, clicks, 600) as sent:
            while kills < 5:
                base = _n_decided(kenv)
                wait_for(lambda b=base: _n_decided(kenv) >= b + 400 or (sent.is_set() and _n_decided(kenv) > b),
                         240, "decisions after a restart", [w])
                os.kill(w.pid, signal.SIGKILL)
                w.wait()
                kills += 1
                w = _worker(kenv, log)
        wait_for(all_decided(kenv, {c.click_id for c in clicks}, 0), 300, "every click decided", [w])
    finally:
        K.stop(w)
    acc = account(kenv, clicks, 0, f"sigkill x{kills}")
    assert acc["duplicates"] < len(clicks) // 2  # commits advance: a restart re-decides only what was in flight
    _check_counters(kenv, clicks)


def test_graceful_restart_decides_nothing_twice_and_commits_everything(kenv: Any) -> None:
    clicks = _setup(kenv, 8000, seed=23)
    log = kenv.workdir / "w.log"
    w = _worker(kenv, log)
    try:
        asyncio.run(K.produce(kenv.settings, kenv.topics.clicks, clicks[:4000]))
        wait_for(all_decided(kenv, {c.click_id for c in clicks[:4000]}, 0), 240, "first half", [w])
        K.stop(w)  # SIGTERM: Faust commits what it acked and stops
        assert w.returncode == 0, log.read_text()[-2000:]
        got, want = K.wait_committed(kenv.settings, kenv.group, kenv.topics.clicks, 5.0)
        assert got == want, "a graceful stop left offsets uncommitted"
        w = _worker(kenv, log)
        asyncio.run(K.produce(kenv.settings, kenv.topics.clicks, clicks[4000:]))
        wait_for(all_decided(kenv, {c.click_id for c in clicks}, 0), 240, "second half", [w])
        got, want = K.wait_committed(kenv.settings, kenv.group, kenv.topics.clicks, 60.0)
        assert got == want
    finally:
        K.stop(w)
    acc = account(kenv, clicks, 0, "graceful restart")
    assert acc["duplicates"] == 0
    _check_counters(kenv, clicks)


def test_injected_stage_faults_are_retried_or_stop_the_worker(kenv: Any) -> None:
    """Every fail point of both stages raises once (retried in place), then one raises on every attempt (the
    worker stops without committing, exit 70, and a restart decides the rest)."""
    clicks = _setup(kenv, 8000, seed=24)
    log = kenv.workdir / "w.log"
    points = [p for p in stages.FAILPOINTS if p != "ip.score"]
    once = ",".join(f"{p}@{3 + 2 * i}" for i, p in enumerate(points))
    w = _worker(kenv, log, {"SLIDR_FAILPOINTS": once + ",ip.score@40x5"})
    try:
        with paced(kenv.settings, kenv.topics.clicks, clicks, 1000):
            wait_for(lambda: w.poll() is not None, 240, "the fail-stop (ip.score failing 5 times)")
            assert w.returncode == 70, log.read_text()[-3000:]
            w = _worker(kenv, log)
        wait_for(all_decided(kenv, {c.click_id for c in clicks}, 0), 300, "every click decided", [w])
    finally:
        K.stop(w)
    text = log.read_text()
    for p in points:
        assert f"injected fault at {p} " in text, p
    assert text.count("injected fault at ip.score") == 5, text[-3000:]
    assert "worker stopping without committing" in text
    acc = account(kenv, clicks, 0, "injected faults")
    assert acc["duplicates"] < len(clicks) // 2
    _check_counters(kenv, clicks)



def test_a_worker_whose_event_loop_hangs_stops_itself_and_a_restart_decides_the_rest(kenv: Any) -> None:
    """A stage blocks the event loop for good (a fail point that hangs, as a deadlock would): the worker's
    watchdog stops it (exit 70, the reason logged) once ``health_stuck_after_s`` passed, committing nothing past
    the stuck batch; a restart decides every click, each repeated decision equal to the first."""
    clicks = _setup(kenv, 4000, seed=28)
    log = kenv.workdir / "w.log"
    w = _worker(kenv, log, {"SLIDR_FAILPOINTS": "ip.score@5h", "SLIDR_HEALTH_STUCK_AFTER_S": "8"})
    try:
        asyncio.run(K.produce(kenv.settings, kenv.topics.clicks, clicks))
        wait_for(lambda: w.poll() is not None, 240, "the watchdog to stop the hung worker")
        assert w.returncode == 70, log.read_text()[-3000:]
        text = log.read_text()
        assert "(the event loop is blocked)" in text, text[-3000:]
        # the watchdog logged what the worker was doing: the IP stage's batch in progress, and the stack that hangs
        diag = text[text.index("what the stuck worker was doing"):]
        assert "ip batch in progress: for" in diag and "faults.py" in diag, diag[:6000]
        # a supervisor restarts after a backoff; a restart within the stopped member's session (it left without
        # a word) stalled once in a fresh-clone run, the race issue 12 keeps open (see stop 24's closing note)
        w = restart_once_dropped(kenv, log, clicks)
    finally:
        K.stop(w)
    account(kenv, clicks, 0, "hung event loop, watchdog, restart")
    _check_counters(kenv, clicks)

# --- outages -----------------------------------------------------------------------------------------------
def _own_service(s: Any, name: str) -> None:
    if not (s.home / name / f"{name}.pid").exists():
        pytest.skip(f"the {name} in use was not started by this checkout's scripts (slidr up): not ours to stop")


def test_redis_down_30s_under_load_decides_in_degraded_mode(kenv: Any, services: Any) -> None:
    s = kenv.settings
    base = services  # the scripts' own home and addresses (the services fixture's)
    _own_service(base, "redis")
    clicks = _setup(kenv, 16_000, seed=25)
    log = kenv.workdir / "w.log"
    w = _worker(kenv, log)
    down_at = up_at = 0.0
    try:
        with paced(s, kenv.topics.clicks, clicks, 400):
            wait_for(lambda: _n_decided(kenv) >= 1000, 240, "decisions before the outage", [w])
            svc.run_script("redis", "down", base)
            down_at = time.time()
            time.sleep(30)  # the outage itself is a length of time: what the test is about
            svc.run_script("redis", "up", base)
            up_at = time.time()
        wait_for(all_decided(kenv, {c.click_id for c in clicks}, 0), 300, "every click decided", [w])
        # the worker notices Redis is back by itself (its timer tries it), also when no clicks come any more
        wait_for(lambda: "profile cache back" in log.read_text(), 60, "the worker noticing Redis back", [w])
        assert w.poll() is None
    finally:
        K.stop(w)
        if not svc.ping_redis(base):
            svc.run_script("redis", "up", base)
    acc = account(kenv, clicks, 0, "redis down 30 s", equal_repeats=False)
    dec = _decisions(kenv)
    during = sorted((v[0] for v in dec.values() if down_at * 1000 < v[0]["decided_at"] < up_at * 1000),
                    key=lambda d: d["decided_at"])
    assert len(during) > 1000, "decisions stopped while Redis was down"
    assert all(d["degraded"] for d in during[len(during) // 10:])  # (the first batches may still have had Redis)
    assert not any(v[0]["degraded"] for v in dec.values() if v[0]["decided_at"] > up_at * 1000 + 15_000)
    assert acc["duplicates"] == 0
    assert "profile cache unreachable" in log.read_text() and "profile cache back" in log.read_text()
    _check_counters(kenv, clicks)


def test_broker_stop_start_under_load(kenv: Any, services: Any) -> None:
    s = kenv.settings
    base = services
    _own_service(base, "kafka")
    clicks = _setup(kenv, 10_000, seed=26)
    log = kenv.workdir / "w.log"
    w = _worker(kenv, log)
    try:
        with paced(s, kenv.topics.clicks, clicks, 500):
            wait_for(lambda: _n_decided(kenv) >= 1000, 240, "decisions before the broker stops", [w])
            svc.run_script("kafka", "down", base)
            time.sleep(5)
            svc.run_script("kafka", "up", base)
            svc.wait_kafka(base)
        wait_for(all_decided(kenv, {c.click_id for c in clicks}, 0), 300, "every click decided", [w])
    finally:
        K.stop(w)
    acc = account(kenv, clicks, 0, "broker stop/start")
    assert acc["duplicates"] < len(clicks) // 2
    _check_counters(kenv, clicks)



# --- records on the way out (issue 16, item 4) -----------------------------------------------------------
def _max_click(i: int, ts: int) -> Click:
    """A click at the schema's maximum field sizes (multi-byte text where text is free), from one IP."""
    return Click(click_id=f"m{i:05d}-" + "x" * 57, ts=ts, ip="198.51.100.200",
                 session_id=f"s{i % 40}-".ljust(128, "€"), platform="app", ad_id="a" * 64, campaign_id="c" * 64,
                 advertiser_id="v" * 64, placement="€" * 64, user_agent="€" * 512, cpc=0.5, tz_offset_min=60)


def test_a_burst_of_maximum_size_clicks_from_one_ip_is_all_decided(kenv: Any) -> None:
    """2,000 clicks at the schema's maximum field sizes (~2.6 KB each) from one IP in one burst: by-ip and feature-log
    records are bounded by bytes (512 KiB), so none exceeds Kafka's 1 MB limit (a count bound let one by-ip record
    of 512 such clicks reach ~1.5 MB)."""
    s = kenv.settings
    toymodel.build_registry(s.registry_path, version="toy-it", threshold=0.7)
    clicks = [_max_click(i, 1_700_000_000_000 + i) for i in range(2000)]
    size = len(clicks[0].to_json())
    assert size > 2500  # (the 4 KiB payload limit is above what the field bounds allow)
    log = kenv.workdir / "w.log"
    w = _worker(kenv, log)
    try:
        asyncio.run(K.produce(s, kenv.topics.clicks, clicks))
        wait_for(all_decided(kenv, {c.click_id for c in clicks}, 0), 240, "every click decided", [w])
        assert w.poll() is None, log.read_text()[-3000:]
    finally:
        K.stop(w)
    account(kenv, clicks, 0, "2,000 maximum-size clicks from one IP")
    sizes = [len(m.value) for msgs in asyncio.run(K.read_partitions(s, f"{kenv.prefix}.by-ip")).values()
             for m in msgs]
    assert max(sizes) <= stages.RECORD_MAX_BYTES and sum(sizes) > 2000 * size


def test_a_refused_record_batch_stops_the_worker_without_committing_past_it(kenv: Any) -> None:
    """The decisions topic's max.message.bytes lowered below a record batch: the send fails for good, the worker
    stops (exit 70) naming the reason, the clicks behind it stay uncommitted, and once the topic takes them again
    a restart decides every click."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    s = kenv.settings

    async def set_limit(n: int) -> None:
        admin = AIOKafkaAdminClient(**s.kafka_client_kwargs())
        await admin.start()
        try:
            await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, kenv.topics.decisions,
                                                      configs={"max.message.bytes": str(n)})])
        finally:
            await admin.close()

    clicks = _setup(kenv, 3000, seed=27)
    asyncio.run(set_limit(600))  # below any batch of decisions (one decision is ~330 bytes)
    log = kenv.workdir / "w.log"
    w = _worker(kenv, log)
    try:
        asyncio.run(K.produce(s, kenv.topics.clicks, clicks))
        wait_for(lambda: w.poll() is not None, 240, "the worker to stop on the refused batch")
        assert w.returncode == 70
        text = log.read_text()
        assert "worker stopping without committing" in text and "failed for good" in text, text[-3000:]
        assert "MessageSizeTooLarge" in text or "RecordTooLarge" in text or "too large" in text.lower(), text[-3000:]
        committed = asyncio.run(K.committed_offsets(s, kenv.group, kenv.topics.clicks))
        ends = asyncio.run(K.end_offsets(s, kenv.topics.clicks))
        assert sum(committed.values()) < sum(ends.values()), (committed, ends)  # not committed past it
        asyncio.run(set_limit(1_048_588))
        # restart once the stopped worker (exit 70, gone without a word) has left the group, so that this test
        # checks what a refused batch leaves behind, not a restart racing that expiry's rebalance (the SIGKILL
        # tests cover that race; here it left a restarted worker stalled, see the closing notes of stops 23, 24)
        w = restart_once_dropped(kenv, log, clicks)
    finally:
        K.stop(w)
    account(kenv, clicks, 0, "refused record batch, then a restart")
