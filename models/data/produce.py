"""Replay a dataset folder into Kafka (``slidr produce DIR [--rate N] [--limit N] [--prefix P]``).

Clicks go to ``Topics(prefix).clicks`` and purchases to ``Topics(prefix).purchases``, merged into one stream in
event-time order (a purchase follows the clicks before it, so it arrives "at its event time" relative to the
clicks; at equal times clicks go first). Values are the exact JSON line bytes of the files.

Keys: a click is keyed by ``Click.user_key`` (``c:<customer_id>`` or ``s:<session_id>``); a purchase by the user
key of the click it is attributed to, so a user's purchases land on the same partition as that user's clicks
(co-partitioned for per-user state); a purchase whose click is not in the file is keyed by its click id.

Delivery: records are sent in batches; after each batch is acknowledged (``acks=all``) the number of records
acknowledged so far is written to the checkpoint file ``DIR/.produce.<prefix>.json``. Ctrl-C / SIGTERM stop
after the batch in flight is acknowledged and checkpointed, so running the command again resumes exactly
where it stopped (no gap, no duplicate); ``--restart`` ignores the checkpoint. After a hard kill (SIGKILL,
power loss) at most one batch is sent again on resume (at-least-once).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from models.data.dataset import CLICKS, PURCHASES, iter_lines
from slidr.settings import Settings, get_settings
from slidr.topics import Topics

log = logging.getLogger(__name__)

BATCH = 2000  # records per acknowledged batch (= checkpoint granularity)
LINGER_MS = 10  # producer linger: let batches fill
PACED_LINGER_MS = 1  # with --rate the paced batches are small already: a linger only delays every click (the
#                      demo's click-to-decision latency counts it; bench latency's producer uses 1 ms too)


@dataclass
class Record:
    is_click: bool
    key: bytes
    value: bytes


@dataclass
class ProduceResult:
    clicks: int           # clicks sent by this run
    purchases: int        # purchases sent by this run
    acked_total: int      # records acknowledged in all runs (the checkpoint)
    seconds: float
    interrupted: bool

    @property
    def clicks_per_s(self) -> float:
        return self.clicks / self.seconds if self.seconds > 0 else 0.0


def user_key(click: dict[str, Any]) -> str:
    """Same as ``Click.user_key``, on the decoded dict."""
    cid = click.get("customer_id")
    return f"c:{cid}" if cid is not None else f"s:{click['session_id']}"


def merged_records(data: Path, *, purchases: bool = True, limit: int | None = None) -> Iterator[Record]:
    """The dataset's clicks and purchases as one event-time ordered stream of (key, value) records.

    ``limit`` stops after that many clicks (purchases after the last of them are not included).
    """
    click_lines = list(iter_lines(data / CLICKS))
    if limit is not None:
        click_lines = click_lines[:limit]
    clicks = [orjson.loads(x) for x in click_lines]
    keys = {c["click_id"]: user_key(c) for c in clicks}
    cstream = ((c["ts"], 0, i) for i, c in enumerate(clicks))
    plines: list[bytes] = list(iter_lines(data / PURCHASES)) if purchases else []
    pdicts = [orjson.loads(x) for x in plines]
    last_ts = clicks[-1]["ts"] if clicks else -1
    if limit is not None:
        pdicts = [p for p in pdicts if p["ts"] <= last_ts]
    pstream = ((p["ts"], 1, i) for i, p in enumerate(pdicts))
    for _, kind, i in heapq.merge(cstream, pstream):
        if kind == 0:
            yield Record(True, keys[clicks[i]["click_id"]].encode(), click_lines[i])
        else:
            p = pdicts[i]
            yield Record(False, keys.get(p["click_id"], p["click_id"]).encode(), plines[i])


def checkpoint_path(data: Path, prefix: str) -> Path:
    return data / f".produce.{prefix}.json"


def _fingerprint(data: Path, purchases: bool, limit: int | None) -> dict[str, Any]:
    st = (data / CLICKS).stat()
    return {"clicks_size": st.st_size, "purchases": purchases, "limit": limit}


def read_checkpoint(data: Path, prefix: str, fp: dict[str, Any]) -> int:
    p = checkpoint_path(data, prefix)
    if not p.exists():
        return 0
    ck = orjson.loads(p.read_bytes())
    if ck.get("fingerprint") != fp:
        log.warning("checkpoint %s is for other data/options: starting from the beginning", p)
        return 0
    return int(ck["acked"])


def write_checkpoint(data: Path, prefix: str, fp: dict[str, Any], acked: int, done: bool) -> None:
    p = checkpoint_path(data, prefix)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(orjson.dumps({"acked": acked, "done": done, "fingerprint": fp}))
    os.replace(tmp, p)


async def produce(
    data: str | Path,
    *,
    rate: float | None = None,      # target clicks/s; None = as fast as possible
    limit: int | None = None,       # at most this many clicks
    prefix: str | None = None,      # topic prefix; None = settings.topic_prefix
    restart: bool = False,          # ignore the checkpoint
    purchases: bool = True,         # also send purchases
    progress: bool = False,         # rich progress bar
    settings: Settings | None = None,
    stop: asyncio.Event | None = None,  # set it to stop gracefully (signals set it too)
    batch: int = BATCH,
) -> ProduceResult:
    """Send the dataset to Kafka; see the module docstring. Returns what this run sent."""
    from aiokafka import AIOKafkaProducer

    s = settings or get_settings()
    d = Path(data)
    topics = Topics(prefix or s.topic_prefix)
    fp = _fingerprint(d, purchases, limit)
    start_at = 0 if restart else read_checkpoint(d, topics.prefix, fp)
    records = list(merged_records(d, purchases=purchases, limit=limit))
    total_clicks = sum(r.is_click for r in records)
    done_clicks = sum(r.is_click for r in records[:start_at])

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)

    producer = AIOKafkaProducer(**s.kafka_client_kwargs(), acks="all",
                                linger_ms=LINGER_MS if rate is None else PACED_LINGER_MS,
                                max_batch_size=256 * 1024, enable_idempotence=True)
    await producer.start()
    sent_c = sent_p = 0
    acked = start_at
    t0 = time.perf_counter()
    bar: Any = None
    try:
        for t in (topics.clicks, topics.purchases) if purchases else (topics.clicks,):
            if not await producer.partitions_for(t):
                raise RuntimeError(f"topic {t} does not exist (create it: slidr topics create)")
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            bar = Progress(TextColumn("clicks"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                           TimeRemainingColumn())
            bar.start()
            task = bar.add_task("produce", total=total_clicks, completed=done_clicks, rate="")
        step = batch if rate is None else max(1, min(batch, int(rate / 20)))  # ~20 paced batches/s
        i = start_at
        while i < len(records) and not stop.is_set():
            chunk = records[i: i + step]
            futs = [await producer.send(topics.clicks if r.is_click else topics.purchases, r.value, key=r.key)
                    for r in chunk]
            await asyncio.gather(*futs)
            n_c = sum(r.is_click for r in chunk)
            sent_c += n_c
            sent_p += len(chunk) - n_c
            i += len(chunk)
            acked = i
            write_checkpoint(d, topics.prefix, fp, acked, acked == len(records))
            elapsed = time.perf_counter() - t0
            if bar is not None:
                bar.update(task, advance=n_c, rate=f"{sent_c / max(elapsed, 1e-9):,.0f}/s")
            if rate:
                ahead = sent_c / rate - elapsed
                if ahead > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), ahead)
    finally:
        await producer.stop()  # flushes anything still buffered
        if bar is not None:
            bar.stop()
        for sig in installed:
            loop.remove_signal_handler(sig)
    return ProduceResult(sent_c, sent_p, acked, time.perf_counter() - t0, interrupted=acked < len(records))
