"""Replay: re-decide a range of clicks with another model or with recomputed features, and publish corrections.

A range is per-partition offsets ``[start, end)`` of the clicks topic (``--from``/``--to`` as offsets, or as times
translated with the broker's offsets-for-times on the records' timestamps). Two modes:

- ``rescore``: the feature-log rows of the range's clicks are scored with the chosen model (no state). A click
  whose row is missing or was written under another feature spec cannot be rescored: the replay refuses before
  it publishes anything and says to use recompute. A row scored in degraded mode gets its profile features from
  the cache now.
- ``recompute``: a replay agent (``slidr replay-agent``: the live worker's app factory with a replay's
  ``Wiring``, so the very same ``UserStage`` / ``IpStage`` objects) with its own app id, consumer group, tables
  and changelogs reads the raw clicks from a warm-up point (24 h of event time before the range, plus the
  lateness and skew bounds) into private topics. Its user stage's by-ip records are handed to its IP stage in
  the order the live IP stage counted those clicks (the live feature log's order: the live watermark's release
  order, whose exceptions depend on timing two runs do not share; the agent runs without the watermark), so
  features equal the live run's bit for bit; clicks the live by-ip topic no longer holds follow in the replay's
  own order. The live tables, topics and group are never written.

Corrections (``publish``): for each click of the range whose new decision differs in validity from the latest one
billing holds (``--all``: every click), a decision with ``revision`` = that one's + 1 and the replay id. A click
whose latest decision was degraded is always re-sent; a click whose latest decision already carries this replay
id is never sent again. The replay id is a hash of the resolved range, model version, mode and ``--all``: the
same replay run twice publishes nothing the second time. Progress is checkpointed per partition after each
acknowledged chunk (``<home>/replay/<id>.checkpoint.json``); an interrupted replay run again resumes there, and
the replay-id rule covers a chunk sent but not checkpointed. Every run appends a record to
``<home>/replay/records.jsonl`` (``slidr replay list``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from schemas.events import Click, SchemaError, decode_click
from slidr.settings import Settings
from slidr.topics import ReplayTopics, Topics, TopicSpec, replay_topics, replay_worker_id
from stream import faults
from stream import features as F
from stream.scoring import Model, decision_dicts, load_model, score_batch

log = logging.getLogger(__name__)
MODES = ("rescore", "recompute")
WARMUP_MS = F.TTL_MS  # the longest feature window: counters before the range equal the live run's
CHUNK = 2000  # clicks per published, acknowledged and checkpointed chunk
SCORE_BATCH = 4096
Offsets = dict[int, int]
Progress = Callable[[str, int, int], None]  # (phase, done, total)


class ReplayError(RuntimeError):
    """A replay that cannot run as asked (bad range, no model, missing feature-log rows...): nothing published."""


# --- the range ------------------------------------------------------------------------------------------------
_OFFSETS_RE = re.compile(r"\d+:\d+(,\d+:\d+)*")


def parse_bound(text: str) -> Offsets | int:
    """``p:o[,p:o...]`` (clicks-topic offsets; partitions left out are not replayed) or a time: epoch
    milliseconds, or ISO 8601 (UTC when it names no zone). Returns offsets, or a time in epoch ms."""
    t = text.strip()
    if _OFFSETS_RE.fullmatch(t):
        out: Offsets = {}
        for item in t.split(","):
            p, o = item.split(":")
            out[int(p)] = int(o)
        return out
    if t.isdigit():
        return int(t)
    try:
        d = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise ReplayError(f"not a range bound: {text!r} (want p:o[,p:o...] offsets, epoch ms or an ISO 8601 "
                          "time)") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=UTC)
    return int(d.timestamp() * 1000)


@dataclass(frozen=True)
class Range:
    start: Offsets
    end: Offsets  # exclusive

    def partitions(self) -> list[int]:
        return sorted(p for p in self.end if self.end[p] > self.start.get(p, 0))

    def size(self) -> int:
        return sum(self.end[p] - self.start[p] for p in self.partitions())

    def to_json(self) -> dict[str, dict[str, int]]:
        return {"start": {str(p): o for p, o in sorted(self.start.items())},
                "end": {str(p): o for p, o in sorted(self.end.items())}}


def range_of(frm: Offsets | int, to: Offsets | int, times: Callable[[int], Offsets], bounds: tuple[Offsets, Offsets],
             partitions: int) -> Range:
    """Resolve two bounds into offsets (pure: ``times(ms)`` answers offsets-for-times, ``bounds`` the
    (beginning, end) offsets). Ends past the log's end stop there; a bound given as offsets for some partitions
    leaves the others out."""
    begin, end_now = bounds

    def resolve(b: Offsets | int) -> Offsets:
        return dict(b) if isinstance(b, dict) else times(b)

    a, z = resolve(frm), resolve(to)
    start: Offsets = {}
    end: Offsets = {}
    for p in range(partitions):
        if p not in a or p not in z:
            continue
        lo = max(a[p], begin.get(p, 0))
        hi = min(z[p], end_now.get(p, 0))
        if hi > lo:
            start[p], end[p] = lo, hi
    if not start:
        raise ReplayError(f"the range holds no click (from {frm}, to {to}; the clicks topic holds {begin} .. "
                          f"{end_now})")
    return Range(start, end)


def replay_id(rng: Range, model_version: str, mode: str, send_all: bool) -> str:
    """Derived from the replay's parameters: the same replay has the same id (and publishes nothing twice)."""
    key = orjson.dumps({"range": rng.to_json(), "model": model_version, "mode": mode, "all": send_all},
                       option=orjson.OPT_SORT_KEYS)
    return "r-" + hashlib.sha256(key).hexdigest()[:16]


# --- corrections (pure) ---------------------------------------------------------------------------------------
@dataclass
class Latest:
    """What billing holds for a click: its latest decision's revision, validity, degraded flag, replay id."""

    revision: int
    valid: bool
    degraded: bool
    replay_id: str | None
    cpc: float = 0.0


def latest_of(values: Iterable[bytes], wanted: set[str] | None = None) -> dict[str, Latest]:
    """The latest decision per click (highest revision; the later record of equal revisions, as billing does)."""
    out: dict[str, Latest] = {}
    for v in values:
        try:
            d = orjson.loads(v)
            cid = d["click_id"]
            if wanted is not None and cid not in wanted:
                continue
            rev = int(d.get("revision", 0))
            old = out.get(cid)
            if old is None or rev >= old.revision:
                out[cid] = Latest(rev, bool(d["valid"]), bool(d.get("degraded", False)), d.get("replay_id"),
                                  float(d.get("cpc", 0.0)))
        except Exception:  # billing skips what it cannot read too (Ledger.bad_records)
            continue
    return out


def correction(new: dict[str, Any], old: Latest | None, rid: str, send_all: bool) -> dict[str, Any] | None:
    """The decision to publish for one click (``new`` with its revision and replay id set), or None."""
    if old is not None and old.replay_id == rid:
        return None  # this replay published it already (a second run, or a resumed one)
    if old is not None and not (send_all or old.degraded or old.valid != new["valid"]):
        return None
    return {**new, "revision": (old.revision if old is not None else 0) + 1, "replay_id": rid}


@dataclass
class Tally:
    """What a replay changed (or would change), per slice and advertiser."""

    considered: int = 0
    published: int = 0
    unchanged: int = 0
    already: int = 0  # published by this replay before (resumed or repeated)
    undecided: int = 0  # in the range, but neither decided before nor now (e.g. dead-lettered)
    rows: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)

    def add(self, d: dict[str, Any], old: Latest | None) -> None:
        row = self.rows.setdefault((d["slice"], d["advertiser_id"]), {
            "to_invalid": 0, "to_valid": 0, "resent": 0, "credited": 0.0, "rebilled": 0.0})
        if old is not None and old.valid and not d["valid"]:
            row["to_invalid"] += 1
            row["credited"] = round(row["credited"] + d["cpc"], 6)  # billed before, credited to the advertiser
        elif old is not None and not old.valid and d["valid"]:
            row["to_valid"] += 1
            row["rebilled"] = round(row["rebilled"] + d["cpc"], 6)  # invalidated before, billable recovered
        else:
            row["resent"] += 1

    def to_json(self) -> dict[str, Any]:
        per: list[dict[str, Any]] = [{"slice": sl, "advertiser": adv, **row}
                                     for (sl, adv), row in sorted(self.rows.items())]
        tot = {k: round(sum(r[k] for r in per), 6) for k in ("to_invalid", "to_valid", "resent", "credited",
                                                              "rebilled")}
        return {"considered": self.considered, "published": self.published, "unchanged": self.unchanged,
                "already_published": self.already, "undecided": self.undecided, **tot, "per_slice_advertiser": per}


# --- Kafka reading --------------------------------------------------------------------------------------------
async def _consumer(s: Settings) -> Any:
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **s.kafka_client_kwargs())
    await c.start()
    return c


async def read_range(s: Settings, topic: str, start: Offsets | None = None, end: Offsets | None = None,
                     partitions: Iterable[int] | None = None) -> dict[int, list[Any]]:
    """Messages of ``topic`` per partition in log order, ``[start, end)`` (default: all there is now)."""
    from aiokafka import TopicPartition

    c = await _consumer(s)
    try:
        parts = sorted(partitions) if partitions is not None else sorted(c.partitions_for_topic(topic) or
                                                                          await _partitions(c, topic))
        tps = {p: TopicPartition(topic, p) for p in parts}
        c.assign(list(tps.values()))
        ends = await c.end_offsets(list(tps.values()))
        begins = await c.beginning_offsets(list(tps.values()))
        stop = {p: min(ends[tp], (end or {}).get(p, ends[tp])) for p, tp in tps.items()}
        out: dict[int, list[Any]] = {p: [] for p in parts}
        todo = set()
        for p, tp in tps.items():
            first = max((start or {}).get(p, begins[tp]), begins[tp])
            if first < stop[p]:
                c.seek(tp, first)
                todo.add(p)
            else:
                c.pause(tp)
        while todo:
            batch = await c.getmany(*[tps[p] for p in todo], timeout_ms=500, max_records=50_000)
            for tp, msgs in batch.items():
                p = tp.partition
                for m in msgs:
                    if m.offset < stop[p]:
                        out[p].append(m)
                if (await c.position(tp)) >= stop[p]:
                    todo.discard(p)
                    c.pause(tp)
        return out
    finally:
        await c.stop()


async def _partitions(c: Any, topic: str) -> set[int]:
    await c._client.force_metadata_update()
    parts = c.partitions_for_topic(topic)
    if not parts:
        raise ReplayError(f"topic {topic} does not exist")
    return set(parts)


async def log_bounds(s: Settings, topic: str) -> tuple[Offsets, Offsets]:
    from aiokafka import TopicPartition

    c = await _consumer(s)
    try:
        tps = [TopicPartition(topic, p) for p in range(s.partitions)]
        b = await c.beginning_offsets(tps)
        e = await c.end_offsets(tps)
        return {tp.partition: o for tp, o in b.items()}, {tp.partition: o for tp, o in e.items()}
    finally:
        await c.stop()


async def offsets_at(s: Settings, topic: str, ms: int) -> Offsets:
    """Per partition, the first offset whose record timestamp is at or after ``ms`` (the end offset if none)."""
    from aiokafka import TopicPartition

    c = await _consumer(s)
    try:
        tps = [TopicPartition(topic, p) for p in range(s.partitions)]
        found = await c.offsets_for_times(dict.fromkeys(tps, max(ms, 0)))
        ends = await c.end_offsets(tps)
        return {tp.partition: (found[tp].offset if found.get(tp) is not None else ends[tp]) for tp in tps}
    finally:
        await c.stop()


async def resolve(s: Settings, frm: str, to: str) -> Range:
    clicks = Topics(s.topic_prefix).clicks
    a, z = parse_bound(frm), parse_bound(to)
    times = {b: await offsets_at(s, clicks, b) for b in (a, z) if isinstance(b, int)}
    return range_of(a, z, times.__getitem__, await log_bounds(s, clicks), s.partitions)


def clicks_in(msgs: dict[int, list[Any]]) -> dict[int, list[tuple[int, Click]]]:
    """The valid clicks of each partition with their offsets (what the live worker dead-lettered is left out)."""
    out: dict[int, list[tuple[int, Click]]] = {}
    for p, ms in msgs.items():
        rows = out[p] = []
        for m in ms:
            try:
                rows.append((m.offset, decode_click(m.value)))
            except SchemaError:
                continue
    return out


async def read_latest(s: Settings, wanted: set[str]) -> dict[str, Latest]:
    msgs = await read_range(s, Topics(s.topic_prefix).decisions)
    return latest_of((m.value for ms in msgs.values() for m in ms), wanted)


# --- checkpoint and records -----------------------------------------------------------------------------------
def replay_dir(s: Settings) -> Path:
    d = s.home / "replay"
    d.mkdir(parents=True, exist_ok=True)
    return d


def load_checkpoint(s: Settings, rid: str) -> dict[str, Any]:
    f = replay_dir(s) / f"{rid}.checkpoint.json"
    if not f.exists():
        return {"replay_id": rid, "next": {}, "done": False}
    return dict(orjson.loads(f.read_bytes()))


def save_checkpoint(s: Settings, rid: str, ck: dict[str, Any]) -> None:
    f = replay_dir(s) / f"{rid}.checkpoint.json"
    tmp = f.with_name(f".{f.name}.{os.getpid()}.tmp")
    tmp.write_bytes(orjson.dumps(ck))
    os.replace(tmp, f)


def append_record(s: Settings, rec: dict[str, Any]) -> None:
    """One line per replay run in ``<home>/replay/records.jsonl`` (one write on an O_APPEND descriptor)."""
    fd = os.open(replay_dir(s) / "records.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, orjson.dumps(rec) + b"\n")
    finally:
        os.close(fd)


def records(s: Settings) -> list[dict[str, Any]]:
    f = s.home / "replay" / "records.jsonl"
    if not f.exists():
        return []
    out = []
    for line in f.read_bytes().splitlines():
        try:
            out.append(orjson.loads(line))
        except orjson.JSONDecodeError:  # a torn last line (a crash mid-write)
            continue
    return out


def _who() -> str:
    from models.registry import _who as who

    return who()


# --- publishing -----------------------------------------------------------------------------------------------
async def publish(s: Settings, rid: str, clicks: dict[int, list[tuple[int, Click]]],
                  decided: dict[str, dict[str, Any]], latest: dict[str, Latest], *, send_all: bool, dry_run: bool,
                  progress: Progress | None = None) -> Tally:
    """Send the corrections of every click, partition by partition in offset order, a chunk at a time: each
    chunk acknowledged by Kafka, then checkpointed. ``decided``: click id -> its new decision (revision 0, no
    replay id yet)."""
    from aiokafka import AIOKafkaProducer

    tally = Tally()
    ck = load_checkpoint(s, rid) if not dry_run else {"next": {}}
    total = sum(len(v) for v in clicks.values())
    done = 0
    prod = None
    if not dry_run:
        prod = AIOKafkaProducer(linger_ms=5, max_batch_size=512 * 1024, acks="all", **s.kafka_client_kwargs())
        await prod.start()
    topic = Topics(s.topic_prefix).decisions
    try:
        for p in sorted(clicks):
            rows = clicks[p]
            resume = int(ck["next"].get(str(p), -1))
            for i in range(0, len(rows), CHUNK):
                chunk = [(o, c) for o, c in rows[i:i + CHUNK] if o >= resume]
                futs = []
                for _, c in chunk:
                    tally.considered += 1
                    new = decided.get(c.click_id)
                    old = latest.get(c.click_id)
                    if new is None:
                        tally.undecided += 1
                        continue
                    out = correction(new, old, rid, send_all)
                    if out is None:
                        if old is not None and old.replay_id == rid:
                            tally.already += 1
                        else:
                            tally.unchanged += 1
                        continue
                    tally.add(out, old)
                    tally.published += 1
                    if prod is not None:
                        futs.append(await prod.send(topic, key=c.click_id.encode(), value=orjson.dumps(out)))
                if prod is not None and chunk:
                    await asyncio.gather(*futs)  # acknowledged before the checkpoint says so
                    faults.hit("replay.publish")
                    ck["next"][str(p)] = chunk[-1][0] + 1
                    save_checkpoint(s, rid, ck)
                done += len(rows[i:i + CHUNK])
                if progress is not None:
                    progress("publish", done, total)
    finally:
        if prod is not None:
            await prod.stop()
    return tally


# --- rescore --------------------------------------------------------------------------------------------------
def feature_rows(values: Iterable[bytes], wanted: set[str]) -> dict[str, dict[str, Any]]:
    """The feature-log row to rescore per wanted click: its first row scored with profiles, else its first."""
    from stream.stages import read_feature_log

    out: dict[str, dict[str, Any]] = {}
    for v in values:
        try:
            rows = read_feature_log(v)
        except Exception:
            continue
        for r in rows:
            cid = r["click_id"]
            if cid in wanted:
                old = out.get(cid)
                if old is None or (old["degraded"] and not r["degraded"]):
                    out[cid] = r
    return out


def _profiles_now(s: Settings, clicks: list[Click]) -> list[F.Profile]:
    import redis

    r = redis.Redis.from_url(s.redis_url, socket_timeout=5, socket_connect_timeout=5, **s.redis_kwargs())
    pre = s.redis_key_prefix + ":"
    keys: list[str] = []
    for c in clicks:
        ck, ik = F.profile_keys(c)
        keys += [pre + (ck or "-"), pre + ik]
    try:
        vals = r.mget(keys) if keys else []
    except Exception as e:
        raise ReplayError(f"the profile cache is unreachable ({e!r}): clicks decided in degraded mode cannot be "
                          "re-decided now; run the replay again when it is back") from None
    return [F.profile_from(vals[2 * j], vals[2 * j + 1]) for j in range(len(clicks))]


def score_rows(model: Model, clicks: list[Click], rows: list[list[float]], decided_at: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(0, len(clicks), SCORE_BATCH):
        x = np.asarray(rows[i:i + SCORE_BATCH], dtype=np.float32)
        out += decision_dicts(model, clicks[i:i + SCORE_BATCH], score_batch(model, x), decided_at=decided_at,
                              features=x)
    return out


async def rescore_decisions(s: Settings, model: Model, clicks: dict[int, list[tuple[int, Click]]],
                            progress: Progress | None) -> dict[str, dict[str, Any]]:
    flat = [c for rows in clicks.values() for _, c in rows]
    wanted = {c.click_id for c in flat}
    fl = await read_range(s, Topics(s.topic_prefix).feature_log)
    if progress is not None:
        progress("feature log", 1, 1)
    rows = feature_rows((m.value for ms in fl.values() for m in ms), wanted)
    missing = [c.click_id for c in flat if c.click_id not in rows]
    other = [cid for cid, r in rows.items() if r["feature_spec_hash"] != F.FEATURE_SPEC_HASH]
    if missing or other:
        raise ReplayError(f"{len(missing)} clicks of the range have no feature-log row (e.g. "
                          f"{missing[:3]}) and {len(other)} were logged under another feature spec: rescore "
                          "cannot re-decide them; run --mode recompute (nothing was published)")
    feats = [list(rows[c.click_id]["features"]) for c in flat]
    deg = [j for j, c in enumerate(flat) if rows[c.click_id]["degraded"]]
    if deg:
        for j, prof in zip(deg, _profiles_now(s, [flat[j] for j in deg]), strict=True):
            feats[j][-len(F.MISSING_PROFILE):] = prof
    ds = score_rows(model, flat, feats, int(time.time() * 1000))
    return {c.click_id: d for c, d in zip(flat, ds, strict=True)}


# --- recompute ------------------------------------------------------------------------------------------------
def settings_env(s: Settings) -> dict[str, str]:
    """The environment that gives a child process these settings (secrets included: a child of ours)."""
    from pydantic import SecretStr

    env = dict(os.environ)
    for name in type(s).model_fields:
        v = getattr(s, name)
        if v is None:
            env.pop(f"SLIDR_{name.upper()}", None)
            continue
        env[f"SLIDR_{name.upper()}"] = v.get_secret_value() if isinstance(v, SecretStr) else str(v)
    return env


def agent_settings(s: Settings, rid: str) -> Settings:
    # no watermark: the driver hands the agent's IP stage its clicks already in the live IP stage's counting order
    return s.model_copy(update={"worker_id": replay_worker_id(s, rid), "worker_web_port": 0, "metrics_port": 0,
                                "ip_watermark": False})


def agent_wiring(s: Settings, rid: str) -> Any:
    from stream.app import Wiring

    t = replay_topics(s, rid)
    return Wiring(t, t.by_user, t.by_ip_raw, t.by_ip)


def run_agent(s: Settings, rid: str, model_dir: Path) -> None:
    """The replay agent (``slidr replay-agent``): the live worker's app with a replay's wiring and group."""
    from stream.app import run_worker

    a = agent_settings(s, rid)
    run_worker(a, model_dir=model_dir, data_dir=_agent_dir(a), loglevel="warning", wiring=agent_wiring(s, rid))


def _agent_dir(a: Settings) -> Path:
    return a.home / "faust" / a.worker_id


async def _drop_private(s: Settings, rid: str) -> None:
    from slidr.services import drop_topics_async

    t = replay_topics(s, rid)
    await drop_topics_async(s, t.prefix + ".")
    await drop_topics_async(s, f"{s.topic_prefix}.{replay_worker_id(s, rid)}.")
    shutil.rmtree(_agent_dir(agent_settings(s, rid)), ignore_errors=True)


async def _committed(s: Settings, group: str) -> dict[tuple[str, int], int]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**s.kafka_client_kwargs())
    await admin.start()
    try:
        got = await admin.list_consumer_group_offsets(group)
        return {(tp.topic, tp.partition): m.offset for tp, m in got.items() if m.offset >= 0}
    finally:
        await admin.close()


async def _commit_start(s: Settings, group: str, topic: str, offsets: Offsets) -> None:
    """Point the agent's new group at the warm-up start (a new Faust group would start at the beginning)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.structs import OffsetAndMetadata

    c = AIOKafkaConsumer(group_id=group, enable_auto_commit=False, **s.kafka_client_kwargs())
    await c.start()
    try:
        tps = {p: TopicPartition(topic, p) for p in offsets}
        c.assign(list(tps.values()))
        await c.commit({tps[p]: OffsetAndMetadata(o, "") for p, o in offsets.items()})
    finally:
        await c.stop()


def warmup_start(first: dict[int, Any], begin: Offsets, times: Callable[[int], Offsets], partitions: int) -> Offsets:
    """Per clicks partition (every one: an IP's counters take clicks of all of them), where the warm-up starts:
    the first record stamped (by Kafka) at or after the earliest time of the range's first clicks (the earlier of
    event and record time) minus the longest window and two hours (lateness, clock skew); never before the log's
    beginning nor after the range's start. ``first``: partition -> (record timestamp, event ts, range start)."""
    at = times(min(min(r, e) for r, e, _ in first.values()) - WARMUP_MS - 2 * F.HOUR_MS)
    out: Offsets = {}
    for p in range(partitions):
        o = max(at.get(p, 0), begin.get(p, 0))
        out[p] = min(o, first[p][2]) if p in first else o
    return out


def _pos(rec: dict[str, Any]) -> tuple[int, int]:
    """A by-ip item's clicks position: its ``p`` (a clicks partition and offset), or for a forwarded click its
    ``o`` (its ``p`` is its by-user position, which differs between the live run and a replay)."""
    o = rec.get("o") or rec["p"]
    return int(o[0]), int(o[1])


def live_counting_order(by_ip: dict[int, list[bytes]], feature_log: dict[int, list[bytes]]) -> dict[int, list[bytes]]:
    """The live by-ip items re-grouped in the order the live IP stage counted their clicks: its feature log's
    order per partition (the IP stage releases clicks in event-time order, not in by-ip arrival order; see the
    IP stage's watermark in docs/design.md), one record per feature-log record. Pure."""
    from stream.stages import read_feature_log

    item: dict[str, Any] = {}
    for vs in by_ip.values():
        for v in vs:
            for rec in orjson.loads(v):
                if "c" in rec:  # (not a heartbeat)
                    item.setdefault(rec["c"]["click_id"], rec)
    out: dict[int, list[bytes]] = {}
    for p, vs in feature_log.items():
        seen: set[str] = set()
        for v in vs:
            recs = []
            for r in read_feature_log(v):
                cid = r["click_id"]
                if cid in item and cid not in seen:
                    seen.add(cid)
                    recs.append(item[cid])
            if recs:
                out.setdefault(p, []).append(orjson.dumps(recs))
    return out


def needed(live: dict[int, list[bytes]], in_range: Callable[[int, int], bool], end: Offsets) -> Offsets:
    """Per clicks partition, how far the replay's user stage must read: a range click's IP features count every
    click its IP's partition saw before it in the live run, clicks past the range's end included (another
    partition's, handled earlier). Pure."""
    need = dict(end)
    for p in sorted(live):
        items = [_pos(rec) for v in live[p] for rec in orjson.loads(v) if "c" in rec]
        last = max((i for i, k in enumerate(items) if in_range(*k)), default=-1)
        for k in items[:last + 1]:
            need[k[0]] = max(need.get(k[0], 0), k[1] + 1)
    return need


def sequence(live: dict[int, list[bytes]], raw: dict[int, list[bytes]], keep: Callable[[int, int], bool],
             partitions: int) -> tuple[dict[int, list[bytes]], int]:
    """The by-ip records for the replay's IP stage: the replay user stage's clicks (``raw``: its by-ip records)
    regrouped as the live by-ip records had them (``live``), one record per live record with the clicks of it
    that ``keep(clicks partition, offset)``; the replay's clicks the live topic lacks follow in its own order.
    Returns the records per partition and how many clicks followed the replay's own order. Pure."""
    from stream.stages import RECORD_MAX_BYTES, _chunks

    pos = _pos
    mine: dict[tuple[int, int], tuple[int, bytes]] = {}  # clicks position -> (by-ip partition, encoded item)
    order: list[tuple[int, int]] = []
    for p in sorted(raw):
        for v in raw[p]:
            for rec in orjson.loads(v):
                if "c" not in rec:
                    continue  # a heartbeat (the replay agent runs without the watermark: see run_recompute)
                k = pos(rec)
                if k not in mine and keep(*k):
                    mine[k] = (p, orjson.dumps(rec))
                    order.append(k)
    out: dict[int, list[bytes]] = defaultdict(list)
    used: set[tuple[int, int]] = set()
    for p in sorted(live):
        for v in live[p]:
            items = []
            for rec in orjson.loads(v):
                if "c" not in rec:
                    continue
                k = pos(rec)
                if k in mine and k not in used:
                    used.add(k)
                    items.append(mine[k][1])
            if items:
                out[p].append(b"[" + b",".join(items) + b"]")
    rest: dict[int, list[bytes]] = defaultdict(list)
    n_rest = 0
    for k in order:
        if k not in used:
            rest[mine[k][0]].append(mine[k][1])
            n_rest += 1
    for p, items in rest.items():
        out[p] += [b"[" + b",".join(ch) + b"]" for ch in _chunks(items, RECORD_MAX_BYTES)]
    return dict(out), n_rest


async def _produce_records(s: Settings, topic: str, recs: dict[int, list[bytes]]) -> None:
    from aiokafka import AIOKafkaProducer

    prod = AIOKafkaProducer(linger_ms=5, max_batch_size=1 << 20, max_request_size=1 << 20, acks="all",
                            **s.kafka_client_kwargs())
    await prod.start()
    try:
        futs = [await prod.send(topic, value=v, partition=p) for p, vs in recs.items() for v in vs]
        await asyncio.gather(*futs)
    finally:
        await prod.stop()


async def _wait_consumed(s: Settings, group: str, want: dict[tuple[str, int], int], agent: subprocess.Popen[bytes],
                         log_file: Path, phase: str, progress: Progress | None) -> None:
    """Poll the agent's committed offsets until they reach ``want`` (the agent dying is an error; no progress
    for a minute is logged, every minute, with where its log is)."""
    total = sum(want.values())
    last, since = -1, time.monotonic()
    while True:
        if agent.poll() is not None:
            raise ReplayError(f"the replay agent stopped (exit {agent.returncode}) during {phase}; its log: "
                              f"{log_file}")
        got = await _committed(s, group)
        done = sum(min(got.get(k, 0), o) for k, o in want.items())
        if progress is not None:
            progress(phase, done, total)
        now = time.monotonic()
        if done != last:
            last, since = done, now
        elif now - since >= 60:
            log.warning("replay agent: no progress for %.0f s during %s (%d of %d offsets); its log: %s",
                        now - since, phase, done, total, log_file)
            since = now
        if all(got.get(k, 0) >= o for k, o in want.items()):
            return
        await asyncio.sleep(0.5)


@dataclass
class Recomputed:
    decisions: dict[str, dict[str, Any]]
    features: dict[str, list[float]]
    warmup: Offsets
    own_order: int  # clicks handed to the replay IP stage in its own order (the live by-ip topic lacked them)
    agent_s: float


async def recompute_decisions(s: Settings, rid: str, model: Model, rng: Range, clicks: dict[int, list[Any]],
                              progress: Progress | None) -> Recomputed:
    from slidr.services import create_topics_async

    t0 = time.monotonic()
    live = Topics(s.topic_prefix)
    rt: ReplayTopics = replay_topics(s, rid)
    a = agent_settings(s, rid)
    await _drop_private(s, rid)  # what an interrupted run of this replay left (its state is recomputed whole)
    n = s.partitions
    await create_topics_async(s, [TopicSpec(name, 1 if name == rt.dead_letters else n, "replay " + rid)
                                  for name in (rt.by_user, rt.by_ip_raw, rt.by_ip, rt.decisions, rt.feature_log,
                                               rt.dead_letters)])
    begin, _ = await log_bounds(s, live.clicks)
    firsts = await read_range(s, live.clicks, rng.start, {p: rng.start[p] + 1 for p in rng.partitions()},
                              rng.partitions())
    first: dict[int, Any] = {}
    for p, ms in firsts.items():
        m = ms[0]
        try:
            ev = decode_click(m.value).ts
        except SchemaError:
            ev = m.timestamp
        first[p] = (m.timestamp, ev, rng.start[p])
    at = min(min(r, e) for r, e, _ in first.values()) - WARMUP_MS - 2 * F.HOUR_MS
    resolved = await offsets_at(s, live.clicks, at)
    warm = warmup_start(first, begin, {at: resolved}.__getitem__, n)
    await _commit_start(s, a.worker_id, live.clicks, warm)
    log_file = replay_dir(s) / f"{rid}.agent.log"
    env = settings_env(s)
    agent = subprocess.Popen([sys.executable, "-m", "slidr", "replay-agent", rid, "--model-dir", str(model.folder)],
                             env=env, stdout=log_file.open("ab"), stderr=subprocess.STDOUT)
    live_ip = await read_range(s, f"{live.prefix}.by-ip")
    live_fl = await read_range(s, live.feature_log)
    live_recs = live_counting_order({p: [m.value for m in ms] for p, ms in live_ip.items()},
                                    {p: [m.value for m in ms] for p, ms in live_fl.items()})
    del live_ip, live_fl
    need = needed(live_recs, lambda p, o: rng.start.get(p, 0) <= o < rng.end.get(p, 0), rng.end)
    try:
        # 1. the user stage: every click up to the range's end (and past it, as far as the live IP stage had read
        #    before the range's last clicks), then the foreign clicks it forwarded
        await _wait_consumed(s, a.worker_id, {(live.clicks, p): o for p, o in need.items() if o > warm.get(p, 0)},
                             agent, log_file, "warm-up + range: user stage", progress)
        _, fwd_end = await log_bounds(s.model_copy(update={}), rt.by_user)
        await _wait_consumed(s, a.worker_id, {(rt.by_user, p): o for p, o in fwd_end.items() if o}, agent,
                             log_file, "forwarded clicks", progress)
        # 2. its by-ip records, in the live IP stage's order, to the replay IP stage
        raw = await read_range(s, rt.by_ip_raw)

        def keep(p: int, off: int) -> bool:
            return warm.get(p, need.get(p, 0)) <= off < need.get(p, 0)

        recs, own = sequence(live_recs, {p: [m.value for m in ms] for p, ms in raw.items()}, keep, n)
        if own:
            log.warning("replay %s: %d clicks are not in the live by-ip topic (retention?): the replay's IP stage "
                        "takes them in its own arrival order, so their IP features may differ from the live run's",
                        rid, own)
        await _produce_records(s, rt.by_ip, recs)
        _, ip_end = await log_bounds(s, rt.by_ip)
        await _wait_consumed(s, a.worker_id, {(rt.by_ip, p): o for p, o in ip_end.items() if o}, agent, log_file,
                             "warm-up + range: IP stage", progress)
    finally:
        agent.terminate()
        try:
            agent.wait(30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
    agent_s = time.monotonic() - t0
    wanted = {c.click_id for rows in clicks.values() for _, c in rows}
    ds = await read_range(s, rt.decisions)
    decisions: dict[str, dict[str, Any]] = {}
    for ms in ds.values():
        for m in ms:
            d = orjson.loads(m.value)
            if d["click_id"] in wanted:
                decisions.setdefault(d["click_id"], d)
    fl = await read_range(s, rt.feature_log)
    rows = feature_rows((m.value for ms in fl.values() for m in ms), wanted)
    await _drop_private(s, rid)
    deg = sum(1 for d in decisions.values() if d.get("degraded"))
    if deg:
        raise ReplayError(f"the profile cache was unreachable during the replay: {deg} clicks were scored in "
                          "degraded mode; nothing was published, run the replay again when the cache is back")
    return Recomputed({k: {**d, "revision": 0, "replay_id": None} for k, d in decisions.items()},
                      {k: r["features"] for k, r in rows.items()}, warm, own, agent_s)


# --- the replay -----------------------------------------------------------------------------------------------
@dataclass
class Result:
    replay_id: str
    mode: str
    model_version: str
    range: Range
    dry_run: bool
    tally: Tally
    seconds: float
    clicks: int
    status: str = "done"
    features: dict[str, list[float]] = field(default_factory=dict)  # recompute: the features it computed
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"replay_id": self.replay_id, "mode": self.mode, "model": self.model_version,
                "range": self.range.to_json(), "dry_run": self.dry_run, "status": self.status,
                "clicks": self.clicks, "seconds": round(self.seconds, 3),
                "clicks_per_s": round(self.clicks / max(self.seconds, 1e-6)), **self.extra,
                "counts": self.tally.to_json()}


def model_folder(s: Settings, version: str | None) -> Path:
    from models import registry

    v = version or registry.stable_version(s)
    if v is None:
        raise ReplayError(f"no --model given and the registry {s.registry_path} has no STABLE model")
    folder = s.registry_path / registry.check_version(v)
    if not folder.is_dir():
        raise ReplayError(f"model {v} is not in the registry {s.registry_path}")
    return folder


def replay(s: Settings, frm: str, to: str, *, model: str | None = None, mode: str = "rescore",
           dry_run: bool = False, send_all: bool = False, progress: Progress | None = None,
           restart: bool = False) -> Result:
    """Run one replay (module doc); raises ReplayError for what it cannot do (nothing published then)."""
    return asyncio.run(_replay(s, frm, to, model=model, mode=mode, dry_run=dry_run, send_all=send_all,
                               progress=progress, restart=restart))


async def _replay(s: Settings, frm: str, to: str, *, model: str | None, mode: str, dry_run: bool, send_all: bool,
                  progress: Progress | None, restart: bool) -> Result:
    if mode not in MODES:
        raise ReplayError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    m = load_model(model_folder(s, model), s.onnx_providers)
    rng = await resolve(s, frm, to)
    rid = replay_id(rng, m.version, mode, send_all)
    t0 = time.monotonic()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    rec: dict[str, Any] = {"replay_id": rid, "by": _who(), "started": started, "mode": mode, "model": m.version,
                           "from": frm, "to": to, "range": rng.to_json(), "all": send_all, "dry_run": dry_run}
    if restart and not dry_run:
        (replay_dir(s) / f"{rid}.checkpoint.json").unlink(missing_ok=True)
    ck = load_checkpoint(s, rid)
    if ck.get("done") and not dry_run:
        log.info("replay %s is complete already (its checkpoint): nothing to do", rid)
        res = Result(rid, mode, m.version, rng, dry_run, Tally(), time.monotonic() - t0, 0, status="complete")
        append_record(s, {**rec, "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                          "status": res.status, "counts": res.tally.to_json()})
        return res
    status = "failed"
    tally = Tally()
    res = Result(rid, mode, m.version, rng, dry_run, tally, 0.0, rng.size())
    try:
        msgs = await read_range(s, Topics(s.topic_prefix).clicks, rng.start, rng.end, rng.partitions())
        clicks = clicks_in(msgs)
        if progress is not None:
            progress("clicks", 1, 1)
        if mode == "rescore":
            decided = await rescore_decisions(s, m, clicks, progress)
        else:
            rc = await recompute_decisions(s, rid, m, rng, clicks, progress)
            decided = rc.decisions
            res.features = rc.features
            res.extra = {"warmup_start": {str(p): o for p, o in sorted(rc.warmup.items())},
                         "own_order_clicks": rc.own_order, "agent_seconds": round(rc.agent_s, 3)}
        wanted = {c.click_id for rows in clicks.values() for _, c in rows}
        latest = await read_latest(s, wanted)
        res.tally = tally = await publish(s, rid, clicks, decided, latest, send_all=send_all, dry_run=dry_run,
                                          progress=progress)
        status = "dry-run" if dry_run else "done"
        if not dry_run:
            ck = load_checkpoint(s, rid)
            ck["done"] = True
            save_checkpoint(s, rid, ck)
        return res
    except (KeyboardInterrupt, asyncio.CancelledError, faults.InjectedFault):
        status = "interrupted"
        raise
    finally:
        res.seconds = time.monotonic() - t0
        res.status = status
        append_record(s, {**rec, "finished": datetime.now(UTC).isoformat(timespec="seconds"), "status": status,
                          "seconds": round(res.seconds, 3), "counts": tally.to_json()})


def summary_lines(r: Result) -> list[str]:
    t = r.tally.to_json()
    lines = [f"replay {r.replay_id} ({r.mode}, model {r.model_version}{', dry run' if r.dry_run else ''}): "
             f"{r.status}, {t['considered']} clicks in {r.seconds:.1f} s",
             f"  {'would publish' if r.dry_run else 'published'} {t['published']}: {t['to_invalid']} now invalid "
             f"(credited {t['credited']:.2f}), {t['to_valid']} now valid (re-billed {t['rebilled']:.2f}), "
             f"{t['resent']} re-sent unchanged; {t['unchanged']} unchanged, {t['already_published']} published "
             f"by this replay before, {t['undecided']} undecided"]
    return lines


def flips_table(r: Result) -> Any:
    from rich.table import Table

    tab = Table(title=f"replay {r.replay_id}: decisions that {'would ' if r.dry_run else ''}change")
    for col in ("slice", "advertiser", "valid->invalid", "invalid->valid", "re-sent", "credited", "re-billed"):
        tab.add_column(col, justify="left" if col in ("slice", "advertiser") else "right")
    for row in r.tally.to_json()["per_slice_advertiser"]:
        tab.add_row(row["slice"], row["advertiser"], str(row["to_invalid"]), str(row["to_valid"]),
                    str(row["resent"]), f"{row['credited']:.2f}", f"{row['rebilled']:.2f}")
    return tab

