"""Retrain from what the stream saw (``slidr retrain``): data guardrails -> train -> calibrate -> model guardrails
-> register as candidate -> promote.

Training rows come from the topics over a window of event time ending at the newest click of the feature log
(or ``end_ms``): the feature log gives each decided click's features exactly as they were scored
(``stream.stages.read_feature_log``; the first record of a click wins, degraded-mode rows and rows of another
feature spec are left out), the purchases topic its label, the clicks topic its user key, slice and time zone
(the robotic mask counts clicks per user key and clock hour; sample weights use the local hour). Labels are the
trainer's (``models.labels.weak_labels``): a purchase, or a high RFM score read from the logged ``rfm_score`` of a
known customer (``rfm_known``). A dataset folder (``data_dir``) goes through ``models.train.build_training_data``.

One run per window: the outcome is kept in ``<registry>/retrain/<key>.json`` (key: source, window, config,
feature spec); a second run with the same key does nothing and returns that outcome. Dry runs record nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from models import guardrails, registry
from models.config import TrainConfig
from models.guardrails import Check, GuardrailError, Report
from models.labels import TEST, TRAIN, VAL, config_labels, consistent_with_history, time_split
from models.metrics import robotic_mask
from models.train import TrainingData
from models.weights import local_hour_dow
from slidr.settings import Settings, get_settings

log = logging.getLogger(__name__)

RETRAIN_DIR = ".retrain"  # outcome records, under the registry folder (dot: not a version)
WORK_DIR = ".work"  # model folders being built, under the registry folder (dot: not a version)
_UNITS = {"m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_window(text: str) -> int:
    """``3d``, ``36h``, ``90m`` -> milliseconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([mhd])\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"window {text!r}: expected a positive number and a unit, e.g. 3d, 36h, 90m")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def parse_time(text: str) -> int:
    """Epoch milliseconds, or an ISO time (``2026-11-04T00:00:00Z``) -> epoch milliseconds."""
    if re.fullmatch(r"\d+", text.strip()):
        return int(text)
    t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return int((t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp() * 1000)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Source:
    """A window's training data and what the data guardrails need beside it."""

    td: TrainingData | None  # None when the rows cannot form the splits (see ``error``)
    x: npt.NDArray[np.float32]
    ts: npt.NDArray[np.int64]
    purchased: npt.NDArray[np.bool_]
    slices: npt.NDArray[np.str_]
    purchase_ts: npt.NDArray[np.int64]  # purchases attributed to the window's clicks, at their own time
    window: tuple[int, int]  # [start, end) epoch ms
    desc: str  # where the rows came from (the manifest's data_dir)
    outages: list[tuple[int, int]] = field(default_factory=list)  # declared purchase-label outages
    counts: dict[str, int] = field(default_factory=dict)
    error: str = ""
    prev_volume: dict[str, Any] | None = None  # slice volume of the window before, when the source still holds it


def training_data(x: npt.NDArray[np.float32], ts: npt.NDArray[np.int64], purchased: npt.NDArray[np.bool_],
                  rfm: npt.NDArray[np.float64], user_keys: list[str], slices: list[str], logged_in: list[bool],
                  tz: npt.NDArray[np.int64], cfg: TrainConfig, meta: dict[str, Any], sessions: list[str],
                  consistent: npt.NDArray[np.bool_] | None = None) -> TrainingData:
    """``models.train.build_training_data`` from row arrays (in arrival order) instead of a dataset folder: the
    same robotic mask, weak labels, unverified rows, local hour, split and split checks. ``rfm`` is NaN for unknown
    customers; ``sessions`` are the clicks' session ids (each account's first session, the purchase sessions), and
    ``consistent`` (``models.labels.consistent_with_history`` of the same clicks) is needed when
    ``cfg.rfm_needs_history``."""
    heavy = robotic_mask(user_keys, ts, cfg.coverage_k)
    label, unverified = config_labels(cfg, purchased, rfm, heavy, ts, user_keys, sessions, consistent)
    hour, dow = local_hour_dow(ts, tz)
    split = time_split(ts, meta.get("start_ms"), cfg.test_days, cfg.val_days, cfg.val_frac, cfg.test_frac)
    td = TrainingData(x=x, label=label, purchased=purchased, heavy=heavy, slices=np.array(slices, dtype=str),
                      logged_in=np.asarray(logged_in, dtype=bool), ts=ts, hour=hour, dow=dow, split=split,
                      usable=np.ones(len(ts), dtype=bool), meta=meta, unverified=unverified)
    for i, name in ((TRAIN, "train"), (VAL, "val")):
        m = td.rows(i)
        guardrails.check_split(label[m], purchased[m], name)
    return td


def mature_only(td: TrainingData, purchase_ts: npt.NDArray[np.int64], outages: list[Any], cfg: TrainConfig) -> None:
    """Leave out the clicks whose weak label is not final, as training does (``pipeline.mask_unlabelled``: younger
    than the attribution window when labels end, or with that window overlapping an outage). Labels end at the last
    event read, on both paths (a stream window has no declared end), so a folder and the stream that carried it
    give the same rows."""
    from types import SimpleNamespace

    from models.pipeline import mask_unlabelled

    ds_like = SimpleNamespace(purchases=[SimpleNamespace(ts=int(t)) for t in purchase_ts], label_outages=outages)
    end = td.meta.pop("end_ms", None)
    try:
        mask_unlabelled(td, ds_like, cfg)
    finally:
        if end is not None:
            td.meta["end_ms"] = end


# ---- sources ---------------------------------------------------------------------------------------------------
def from_dataset(data_dir: Path, cfg: TrainConfig) -> Source:
    """A dataset folder as one window (its whole span); declared outages are left out as in training."""
    from models.data.dataset import load_dataset
    from models.train import build_training_data

    ds = load_dataset(data_dir)
    ts = np.asarray(ds.ts, dtype=np.int64)
    window = (int(ts.min()), int(ts.max()) + 1) if len(ts) else (0, 0)
    td, err = None, ""
    buy_ts = np.array([p.ts for p in ds.purchases], dtype=np.int64)
    try:  # label gaps are the guardrails' to report, with the hours, rather than the trainer's to raise
        td = build_training_data(ds, cfg.replace(allow_label_gaps=True), cache_dir=get_settings().cache_dir)
    except GuardrailError as e:
        err = str(e)
    usable = (td.usable.copy() if td is not None else ~ds.in_label_outage(ts))  # the window's rows, for the guards
    if td is not None:
        try:
            mature_only(td, buy_ts, list(ds.label_outages), cfg)  # the rows training and evaluation use
        except GuardrailError as e:
            td, err = None, str(e)
    x = td.x[usable] if td is not None else np.zeros((0, 0), dtype=np.float32)
    if td is None:
        from models.train import dataset_features

        x = dataset_features(ds, get_settings().cache_dir)[usable]
    return Source(td=td, x=x, ts=ts[usable], purchased=np.asarray(ds.purchased, dtype=bool)[usable],
                  slices=np.array([c.slice for c in ds.clicks], dtype=str)[usable], purchase_ts=buy_ts,
                  window=window, desc=str(data_dir), outages=list(ds.label_outages),
                  counts={"clicks": len(ts), "usable": int(usable.sum()), "purchases": len(buy_ts)}, error=err)


async def _read_topic(s: Settings, topic: str, handle: Any) -> int:
    """Hand every message of ``topic`` (from the beginning up to the end offsets seen at the start) to
    ``handle(value)``; returns the count."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    p = AIOKafkaProducer(**s.kafka_client_kwargs())  # partitions_for: the public metadata call
    await p.start()
    try:
        parts = await p.partitions_for(topic)
    finally:
        await p.stop()
    if not parts:
        raise RuntimeError(f"topic {topic} does not exist")
    c = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **s.kafka_client_kwargs())
    await c.start()
    n = 0
    try:
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        ends = await c.end_offsets(tps)
        todo = {tp for tp in tps if ends[tp] > 0}
        while todo:
            batch = await c.getmany(*todo, timeout_ms=1000, max_records=20_000)
            for tp, msgs in batch.items():
                for m in msgs:
                    if m.offset < ends[tp] and m.value is not None:
                        handle(m.value)
                        n += 1
            todo = {tp for tp in todo if await c.position(tp) < ends[tp]}
    finally:
        await c.stop()
    return n


def from_stream(s: Settings, cfg: TrainConfig, window_ms: int, end_ms: int | None = None) -> Source:
    """The window ``[end - window_ms, end)`` of the feature-log, clicks and purchases topics (see module doc)."""
    from schemas.events import Click
    from slidr.topics import Topics
    from stream.features import FEATURE_NAMES, FEATURE_SPEC_HASH, ip_range_key
    from stream.stages import read_feature_log

    t = Topics(s.topic_prefix)
    rows: dict[str, tuple[int, npt.NDArray[np.float32]]] = {}  # float32 rows: a quarter of Python lists' memory
    counts = {"feature_log_rows": 0, "redelivered": 0, "degraded": 0, "other_spec": 0}

    def on_log(value: bytes) -> None:
        for r in read_feature_log(value):
            counts["feature_log_rows"] += 1
            if r["feature_spec_hash"] != FEATURE_SPEC_HASH:
                counts["other_spec"] += 1
            elif r["degraded"]:
                counts["degraded"] += 1
            elif r["click_id"] in rows:
                counts["redelivered"] += 1
            else:
                rows[r["click_id"]] = (int(r["ts"]), np.asarray(r["features"], dtype=np.float32))

    clicks: dict[str, Click] = {}
    buys: dict[str, list[int]] = {}

    def on_click(value: bytes) -> None:
        try:
            c = Click.model_validate_json(value)
        except ValueError:  # dead-lettered by the worker: never scored
            return
        clicks.setdefault(c.click_id, c)

    def on_purchase(value: bytes) -> None:
        try:
            p = orjson.loads(value)
            buys.setdefault(str(p["click_id"]), []).append(int(p["ts"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return

    async def read_all() -> None:
        await _read_topic(s, t.feature_log, on_log)
        await _read_topic(s, t.clicks, on_click)
        await _read_topic(s, t.purchases, on_purchase)

    t0 = time.perf_counter()
    asyncio.run(read_all())
    if not rows:
        raise RuntimeError(f"the feature log {t.feature_log} holds no usable row: nothing to retrain on")
    end = end_ms if end_ms is not None else max(ts for ts, _ in rows.values()) + 1
    start = end - window_ms
    ids = sorted((cid for cid, (ts, _) in rows.items() if start <= ts < end), key=lambda c: (rows[c][0], c))
    missing = [cid for cid in ids if cid not in clicks]
    ids = [cid for cid in ids if cid in clicks]  # arrival order: event time, then click id
    counts |= {"clicks": len(ids), "not_in_clicks_topic": len(missing)}
    before = [clicks[cid] for cid, (ts, _) in rows.items() if start - window_ms <= ts < start and cid in clicks]
    prev_volume = guardrails.slice_volume(np.array([c.ts for c in before], dtype=np.int64),
                                          np.array([c.slice for c in before], dtype=str)) if before else None
    cs = [clicks[cid] for cid in ids]
    n = len(ids)
    x = np.stack([rows[cid][1] for cid in ids]) if n else np.zeros((0, len(FEATURE_NAMES)), dtype=np.float32)
    ts = np.fromiter((rows[cid][0] for cid in ids), dtype=np.int64, count=n)
    purchased = np.fromiter((cid in buys for cid in ids), dtype=bool, count=n)
    known = x[:, FEATURE_NAMES.index("rfm_known")] > 0.5
    rfm = np.where(known, x[:, FEATURE_NAMES.index("rfm_score")].astype(np.float64), np.nan)
    buy_ts = np.array([b for cid in ids for b in buys.get(cid, ())], dtype=np.int64)
    counts["purchases"] = len(buy_ts)
    log.info("read %s, %s and %s in %.1f s: %s", t.feature_log, t.clicks, t.purchases, time.perf_counter() - t0,
             ", ".join(f"{k} {v}" for k, v in counts.items()))
    slices = [c.slice for c in cs]
    desc = f"kafka:{t.feature_log}[{_iso(start)},{_iso(end)})"
    td, err = None, ""
    try:
        # the account-history check sees the window's own clicks (the clicks topic's, with session, user agent, IP)
        keys, sessions = [c.user_key for c in cs], [c.session_id for c in cs]
        consistent = consistent_with_history(keys, sessions, [c.user_agent or "" for c in cs],
                                             [ip_range_key(c.ip_key) for c in cs])
        td = training_data(x, ts, purchased, rfm, keys, slices, [c.logged_in for c in cs],
                           np.fromiter((c.tz_offset_min or 0 for c in cs), dtype=np.int64, count=n), cfg,
                           {"source": "stream", "window": [start, end], "label_outages": []}, sessions, consistent)
        mature_only(td, buy_ts, [], cfg)
    except GuardrailError as e:
        err = str(e)
    return Source(td=td, x=x, ts=ts, purchased=purchased, slices=np.array(slices, dtype=str), purchase_ts=buy_ts,
                  window=(start, end), desc=desc, counts=counts, error=err, prev_volume=prev_volume)


# ---- the run ---------------------------------------------------------------------------------------------------
def _key(src: Source, cfg: TrainConfig, kind: str) -> str:
    from stream.features import FEATURE_SPEC_HASH

    base = src.desc.split("[")[0] if src.desc.startswith("kafka:") else str(Path(src.desc).resolve())
    blob = orjson.dumps({"source": base, "window": list(src.window), "config": cfg.to_dict(), "kind": kind,
                         "feature_spec_hash": FEATURE_SPEC_HASH}, option=orjson.OPT_SORT_KEYS)
    return f"{src.window[0]}-{src.window[1]}-{hashlib.sha256(blob).hexdigest()[:12]}"


def _records(s: Settings) -> list[dict[str, Any]]:
    d = s.registry_path / RETRAIN_DIR
    return [dict(orjson.loads(p.read_bytes())) for p in sorted(d.glob("*.json"))] if d.is_dir() else []


def _previous_volume(s: Settings, src: Source) -> dict[str, Any] | None:
    """The slice volume of the window before this one: from the source when it still holds that window (the
    feature log's retention), else that of the latest recorded retrain whose window ended earlier."""
    if src.prev_volume is not None:
        return src.prev_volume
    prev = [r for r in _records(s) if r["window"]["end_ms"] < src.window[1] and r.get("volume")]
    return max(prev, key=lambda r: r["window"]["end_ms"])["volume"] if prev else None


def _write_record(s: Settings, rec: dict[str, Any]) -> Path:
    from models.pipeline import write_json

    d = s.registry_path / RETRAIN_DIR
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / f"{rec['key']}.json", rec)
    return d / f"{rec['key']}.json"


def retrain(*, window: str | None = "3d", data_dir: Path | None = None, end_ms: int | None = None,
            cfg: TrainConfig | None = None, kind: str = "mlp", dry_run: bool = False, force: bool = False,
            settings: Settings | None = None) -> dict[str, Any]:
    """One retrain; returns ``{"status": promoted | candidate | refused | done, "key", "window", "version",
    "report", "evaluation", "record"}`` (``done``: the window was already retrained, ``previous`` is that outcome).
    A refused run never touches ACTIVE; ``dry_run`` stops before promoting (its candidate stays registered)."""
    s = settings or get_settings()
    cfg = (cfg or TrainConfig()).replace(model=kind)
    if data_dir is not None:
        src = from_dataset(Path(data_dir), cfg)
    else:
        src = from_stream(s, cfg, parse_window(window or "3d"), end_ms)
    key = _key(src, cfg, kind)
    win = {"start": _iso(src.window[0]), "end": _iso(src.window[1]), "start_ms": src.window[0],
           "end_ms": src.window[1]}
    log.info("retrain window %s .. %s (%s): key %s", win["start"], win["end"], src.desc, key)
    with _window_lock(s, key):
        return _run(s, src, key, win, cfg, kind, dry_run, force)


@contextlib.contextmanager
def _window_lock(s: Settings, key: str) -> Iterator[None]:
    """One run per window at a time: an flock on ``<registry>/.retrain/<key>.lock`` (released if the run dies)."""
    import fcntl

    path = s.registry_path / RETRAIN_DIR / f"{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another slidr retrain of this window is running (it holds {path})") from None
        yield


def _run(s: Settings, src: Source, key: str, win: dict[str, Any], cfg: TrainConfig, kind: str, dry_run: bool,
         force: bool) -> dict[str, Any]:
    from models.calibrate import CalibrationError
    from models.pipeline import _clean, _refresh_manifest, calibrate_dir, evaluate_dir, train_to_dir

    done = s.registry_path / RETRAIN_DIR / f"{key}.json"
    if done.exists() and not force:
        prev = dict(orjson.loads(done.read_bytes()))
        log.info("window already retrained (%s, version %s): nothing to do (--force redoes it)", prev["status"],
                 prev.get("version"))
        return {"status": "done", "key": key, "window": win, "previous": prev, "record": str(done)}

    out: dict[str, Any] = {"status": "refused", "key": key, "window": win, "source": src.desc,
                           "counts": src.counts, "version": None, "dry_run": dry_run}

    def finish(report: Report, status: str) -> dict[str, Any]:
        out["status"] = status
        out["report"] = report.to_dict()
        for line in report.lines():
            log.warning("guardrail %s", line)
        if not dry_run:
            out["record"] = str(_write_record(s, _clean({**out, "volume": guardrails.slice_volume(
                src.ts, src.slices), "finished": _iso(int(time.time() * 1000))})))
        return out

    # 1. data guardrails
    report = guardrails.data_checks(src.x, src.ts, src.purchased, src.slices, src.purchase_ts, s,
                                    _previous_volume(s, src), src.outages, label_gaps=not cfg.allow_label_gaps)
    if src.error:
        report.checks.append(Check("data", "splits", False, src.error))
    log.info("data guardrails: %s", "passed" if report.ok else f"{len(report.failed())} check(s) failed")
    if not report.ok or src.td is None:
        return finish(report, "refused")
    td = src.td

    # 2. train, calibrate, evaluate in a work folder of the registry
    work = s.registry_path / WORK_DIR / key
    t0 = time.perf_counter()
    manifest = train_to_dir(Path(src.desc), work, kind, cfg, td)
    try:
        calibrate_dir(work, Path(src.desc), None, "slice", td)
    except CalibrationError as e:
        report.checks.append(Check("model", "calibration", False, str(e)))
        return finish(report, "refused")
    ev = evaluate_dir(work, Path(src.desc), "test", td)
    out["evaluation"] = ev
    out["train_seconds"] = time.perf_counter() - t0
    log.info("trained %s in %.1f s: test IVR %.4f FPR %.4f coverage %.4f AUC %.4f", manifest["model_version"],
             out["train_seconds"], ev["overall"]["ivr"], ev["overall"]["fpr"], ev["overall"]["coverage"],
             ev["overall"]["auc"])

    # 3. model guardrails: candidate vs the stable model on the same evaluation rows (the test split)
    te = td.rows(TEST)
    rows = (td.x[te], td.purchased[te], td.heavy[te], td.slices[te], td.label[te])
    cand = guardrails.model_slice_metrics(work, *rows)
    stable_v, stable, why = registry.stable_version(s), None, "no stable model"
    if stable_v is not None:
        from stream.scoring import ModelError

        try:
            stable = guardrails.model_slice_metrics(s.registry_path / stable_v, *rows)
        except ModelError as e:  # e.g. trained on another feature spec: nothing to compare with on these rows
            why = f"the stable model {stable_v} cannot score this window ({e})"
            log.warning("%s: relative checks skipped", why)
    model_report = guardrails.model_checks(cand, stable, s, why)
    report.checks.extend(model_report.checks)
    out["stable_version"] = stable_v
    out["model_metrics"] = {"candidate": cand, "stable": stable}
    log.info("model guardrails against %s: %s", stable_v or "no stable model",
             "passed" if model_report.ok else f"{len(model_report.failed())} check(s) failed")
    if not report.ok:
        return finish(report, "refused")

    # 4. register as candidate, 5. promote
    reason = f"retrain {win['start']}..{win['end']} ({key})"
    _refresh_manifest(work, retrain={"key": key, "window": win, "source": src.desc, "stable_version": stable_v})
    version = registry.register(work, s, reason=reason)
    shutil.rmtree(work, ignore_errors=True)  # copied into the registry (a refused one stays there to inspect)
    out["version"] = version
    log.info("registered candidate %s", version)
    if dry_run:
        log.info("dry run: %s not promoted", version)
        return finish(report, "candidate")
    registry.promote(version, s, reason=reason)
    log.info("promoted %s (stable: %s)", version, registry.stable_version(s))
    return finish(report, "promoted")
