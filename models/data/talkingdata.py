"""Importer for TalkingData AdTracking click logs (``slidr import talkingdata CSV --out DIR``).

Input: the CSV of the public TalkingData AdTracking Fraud Detection data (``train.csv`` or a sample of it) with
the columns ``ip,app,device,os,channel,click_time,attributed_time,is_attributed``: anonymised integer codes
and UTC times ``YYYY-MM-DD HH:MM:SS``. Output: a dataset folder with the simulator's layout (docs/design.md)
but without ``truth.jsonl``, so every later command (``slidr train``, ``slidr produce`` ...) takes it.

Mapping (one Click per row, stable ids, clicks sorted by time with the row number breaking ties):

- ``click_id``     ``td-<row>``: the 1-based data row number in the file, zero-padded (stable across runs)
- ``ts``           ``click_time`` as epoch ms UTC
- ``ip``           the ip code as a synthetic IPv4 address in 10.0.0.0/8 (``10.0.0.0 + code``, codes < 2^24)
- ``session_id``   the visitor key ``<ip>/<device>/<os>`` (the usual TalkingData user proxy); never logged in
- ``platform``     from ``device`` (the data has no platform; all rows are mobile ad clicks, mostly in-app):
                   device 1 and 2, the two mass-market handset classes (98.7% of the sample) -> ``app``;
                   device 0, "no device reported" (non-handset or unidentified clients) -> ``desktop``;
                   any other device code (specific, rarer handset models, device farms) -> ``mobile``.
                   ``os`` is kept in the visitor key. Change :data:`APP_DEVICES`/:data:`DESKTOP_DEVICES` to
                   use another convention.
- ``advertiser_id`` = ``campaign_id`` = ``app-<app>`` (the advertised app), ``ad_id`` = ``app-<app>.ch-<channel>``,
  ``placement`` = ``ch-<channel>`` (the publisher channel)
- ``cpc``          not in the data: ``cpc`` argument (default 0.0); ``user_agent`` empty; ``tz_offset_min`` null
- a Purchase (``td-p-<row>``) for every ``is_attributed = 1`` row at ``attributed_time`` (the app download is
  the counterpart of a purchase); amount 0.0.
"""

from __future__ import annotations

import csv
import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from models.data.dataset import write_dataset
from schemas.events import Click, Platform, Purchase

APP_DEVICES = frozenset({1, 2})   # mass-market handset classes: in-app clicks
DESKTOP_DEVICES = frozenset({0})  # no device reported
COLUMNS = ("ip", "app", "device", "os", "channel", "click_time", "attributed_time", "is_attributed")
IP_BASE = 10 << 24                # 10.0.0.0


def platform_of(device: int, os_code: int) -> Platform:
    """The documented platform rule (``os_code`` is not used by the default convention)."""
    if device in APP_DEVICES:
        return "app"
    if device in DESKTOP_DEVICES:
        return "desktop"
    return "mobile"


def _ms(t: str) -> int:
    return int(datetime.strptime(t, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp() * 1000)


def _ip(code: int) -> str:
    if not 0 <= code < 1 << 24:
        raise ValueError(f"ip code {code} out of range for the 10.0.0.0/8 mapping")
    x = IP_BASE + code
    return f"{x >> 24}.{(x >> 16) & 255}.{(x >> 8) & 255}.{x & 255}"


def convert_rows(rows: list[dict[str, str]], cpc: float = 0.0) -> tuple[list[Click], list[Purchase]]:
    """CSV rows (dicts, in file order) -> (clicks sorted by ts, purchases sorted by ts)."""
    width = max(6, len(str(len(rows))))
    clicks: list[tuple[int, int, Click]] = []
    purchases: list[tuple[int, int, Purchase]] = []
    for row_no, r in enumerate(rows, start=1):
        ip, app, dev, os_code, ch = (int(r[k]) for k in ("ip", "app", "device", "os", "channel"))
        ts = _ms(r["click_time"])
        cid = f"td-{row_no:0{width}d}"
        clicks.append((ts, row_no, Click(
            click_id=cid, ts=ts, ip=_ip(ip), session_id=f"{ip}/{dev}/{os_code}", platform=platform_of(dev, os_code),
            ad_id=f"app-{app}.ch-{ch}", campaign_id=f"app-{app}", advertiser_id=f"app-{app}", placement=f"ch-{ch}",
            cpc=float(cpc),
        )))
        if r["is_attributed"].strip() == "1":
            if not r["attributed_time"]:
                raise ValueError(f"row {row_no}: is_attributed=1 without attributed_time")
            pts = _ms(r["attributed_time"])
            purchases.append((pts, row_no, Purchase(purchase_id=f"td-p-{row_no:0{width}d}", click_id=cid, ts=pts)))
    clicks.sort(key=lambda x: (x[0], x[1]))
    purchases.sort(key=lambda x: (x[0], x[1]))
    return [c for _, _, c in clicks], [p for _, _, p in purchases]


def import_talkingdata(csv_path: str | Path, out: str | Path, *, limit: int | None = None,
                       cpc: float = 0.0) -> dict[str, Any]:
    """Convert a TalkingData CSV into the dataset folder ``out``; returns the written meta."""
    path = Path(csv_path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: not a TalkingData CSV, missing columns {missing}")
        rows: list[dict[str, str]] = []
        for r in reader:
            if limit is not None and len(rows) >= limit:
                break
            rows.append(r)
    clicks, purchases = convert_rows(rows, cpc)
    slice_counts: dict[str, int] = {}
    for c in clicks:
        slice_counts[c.slice] = slice_counts.get(c.slice, 0) + 1
    start = clicks[0].ts if clicks else 0
    end = clicks[-1].ts if clicks else 0
    meta: dict[str, Any] = {
        "source": "talkingdata", "scenario": None, "seed": None, "input": path.name,
        "input_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "start_ms": start, "end_ms": end + 1, "days": round((end + 1 - start) / 86_400_000, 3),
        "drift": None, "label_outages": [], "slice_counts": dict(sorted(slice_counts.items())),
        "platform_rule": {"app": sorted(APP_DEVICES), "desktop": sorted(DESKTOP_DEVICES), "mobile": "other"},
    }
    d = write_dataset(out, clicks, purchases, (), (), None, meta)
    return dict(orjson.loads((d / "meta.json").read_bytes()))
