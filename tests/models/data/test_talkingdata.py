"""The TalkingData importer: on a small CSV written here (always runs) and on the shared sample (50,015 rows, 105
attributed; skipped when ``../shared`` is not beside the checkout)."""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from models.data.dataset import load_dataset
from models.data.talkingdata import COLUMNS, convert_rows, import_talkingdata, platform_of
from schemas.events import decode_click, decode_purchase
from tests.conftest import TALKINGDATA_CSV, needs_shared

SAMPLE = TALKINGDATA_CSV

# (ip, app, device, os, channel, click_time, attributed_time, is_attributed), in file order: not in time order,
# two attributed rows whose downloads come in the other order, a tie on click_time, every platform rule case
ROWS = [
    ("5", "3", "1", "19", "100", "2017-11-07 10:00:00", "2017-11-07 12:00:00", "1"),  # 1: app, download last
    ("5", "3", "2", "19", "101", "2017-11-07 09:00:00", "", "0"),                     # 2: app (device 2)
    ("300", "9", "0", "0", "7", "2017-11-07 09:30:00", "", "0"),                      # 3: desktop
    ("16777215", "9", "3032", "607", "7", "2017-11-06 23:59:59", "", "0"),            # 4: mobile, first click
    ("0", "12", "1", "13", "497", "2017-11-07 09:30:00", "", "0"),                    # 5: ties with 3: after it
    ("77", "12", "2", "13", "497", "2017-11-07 08:00:00", "2017-11-07 08:30:00", "1"),  # 6: download first
]
# click ids in time order (row number breaks the 09:30:00 tie) and what each maps to
ORDER = ["td-000004", "td-000006", "td-000002", "td-000003", "td-000005", "td-000001"]
PLATFORM = {"td-000001": "app", "td-000002": "app", "td-000003": "desktop", "td-000004": "mobile",
            "td-000005": "app", "td-000006": "app"}
IP = {"td-000001": "10.0.0.5", "td-000003": "10.0.1.44", "td-000004": "10.255.255.255", "td-000005": "10.0.0.0",
      "td-000006": "10.0.0.77"}
T_0800, T_0830, T_1000, T_1200 = 1510041600000, 1510043400000, 1510048800000, 1510056000000  # 2017-11-07 UTC


def _write_csv(path: Path, rows: Sequence[tuple[str, ...]], columns: tuple[str, ...] = COLUMNS) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows(rows)
    return path


@pytest.fixture
def small_csv(tmp_path: Path) -> Path:
    return _write_csv(tmp_path / "train_small.csv", ROWS)


def test_small_csv_clicks_in_time_order_with_the_platform_rule(small_csv: Path, tmp_path: Path) -> None:
    meta = import_talkingdata(small_csv, tmp_path / "out", cpc=0.25)
    out = tmp_path / "out"
    clicks = [decode_click(x) for x in (out / "clicks.jsonl").read_bytes().splitlines()]
    assert [c.click_id for c in clicks] == ORDER
    assert [c.ts for c in clicks] == sorted(c.ts for c in clicks)
    by_id = {c.click_id: c for c in clicks}
    assert {k: c.platform for k, c in by_id.items()} == PLATFORM
    assert {k: by_id[k].ip for k in IP} == IP
    assert by_id["td-000001"].ts == T_1000 and by_id["td-000006"].ts == T_0800
    assert by_id["td-000004"].session_id == "16777215/3032/607" and by_id["td-000002"].session_id == "5/2/19"
    c = by_id["td-000005"]
    assert (c.advertiser_id, c.campaign_id, c.ad_id, c.placement) == ("app-12", "app-12", "app-12.ch-497", "ch-497")
    assert all(not c.logged_in and c.customer_id is None and c.user_agent == "" and c.cpc == 0.25 for c in clicks)

    assert meta["source"] == "talkingdata" and meta["input"] == "train_small.csv"
    assert meta["input_sha256"] == hashlib.sha256(small_csv.read_bytes()).hexdigest()
    assert meta["counts"]["clicks"] == 6 and meta["counts"]["purchases"] == 2
    assert meta["slice_counts"] == {"app:out": 4, "desktop:out": 1, "mobile:out": 1}
    assert meta["start_ms"] == clicks[0].ts and meta["end_ms"] == T_1000 + 1
    assert meta["platform_rule"] == {"app": [1, 2], "desktop": [0], "mobile": "other"}
    assert orjson.loads((out / "meta.json").read_bytes()) == meta
    assert not (out / "truth.jsonl").exists()


def test_small_csv_purchases_attributed_to_their_clicks(small_csv: Path, tmp_path: Path) -> None:
    import_talkingdata(small_csv, tmp_path / "out")
    out = tmp_path / "out"
    purchases = [decode_purchase(x) for x in (out / "purchases.jsonl").read_bytes().splitlines()]
    # one per is_attributed=1 row, at attributed_time, sorted by that time (not by row or click time)
    assert [(p.purchase_id, p.click_id, p.ts) for p in purchases] == [
        ("td-p-000006", "td-000006", T_0830), ("td-p-000001", "td-000001", T_1200)]
    assert all(p.amount == 0.0 and p.customer_id is None for p in purchases)
    ds = load_dataset(out)
    assert ds.truth is None and ds.is_bot is None
    assert [c.click_id for c, bought in zip(ds.clicks, ds.purchased, strict=True) if bought] == [
        "td-000006", "td-000001"]


def test_small_csv_limit_reads_the_first_rows_of_the_file(small_csv: Path, tmp_path: Path) -> None:
    meta = import_talkingdata(small_csv, tmp_path / "out", limit=3)
    clicks = [decode_click(x) for x in (tmp_path / "out" / "clicks.jsonl").read_bytes().splitlines()]
    assert [c.click_id for c in clicks] == ["td-000002", "td-000003", "td-000001"]
    assert meta["counts"]["purchases"] == 1


def test_small_csv_through_the_cli(small_csv: Path, tmp_path: Path) -> None:
    from slidr.cli import app

    r = CliRunner().invoke(app, ["import", "talkingdata", str(small_csv), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "6 clicks, 2 purchases" in r.output
    assert len((tmp_path / "out" / "clicks.jsonl").read_bytes().splitlines()) == 6


def test_rejects_what_is_not_talkingdata(tmp_path: Path) -> None:
    bad = _write_csv(tmp_path / "bad.csv", [r[:5] for r in ROWS], COLUMNS[:5])
    with pytest.raises(ValueError, match="missing columns"):
        import_talkingdata(bad, tmp_path / "out")
    no_time = _write_csv(tmp_path / "no_time.csv", [(*ROWS[0][:6], "", "1")])
    with pytest.raises(ValueError, match="is_attributed=1 without attributed_time"):
        import_talkingdata(no_time, tmp_path / "out")
    assert not (tmp_path / "out" / "clicks.jsonl").exists()


def test_row_mapping_is_stable_and_documented() -> None:
    row = {"ip": "87540", "app": "12", "device": "1", "os": "13", "channel": "497",
           "click_time": "2017-11-07 09:30:38", "attributed_time": "2017-11-07 09:31:00", "is_attributed": "1"}
    other = dict(row, device="0", click_time="2017-11-07 09:00:00", is_attributed="0", attributed_time="")
    clicks, purchases = convert_rows([row, other])
    assert [c.click_id for c in clicks] == ["td-000002", "td-000001"]  # sorted by time, id = row number
    c = clicks[1]
    assert c.ts == 1510047038000 and c.ip == "10.1.85.244" and c.session_id == "87540/1/13"
    assert c.platform == "app" and clicks[0].platform == "desktop" and platform_of(3032, 607) == "mobile"
    assert (c.advertiser_id, c.campaign_id, c.ad_id, c.placement) == ("app-12", "app-12", "app-12.ch-497", "ch-497")
    assert len(purchases) == 1 and purchases[0].click_id == "td-000001" and purchases[0].ts == 1510047060000


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("td")
    import_talkingdata(SAMPLE, out)
    return out


@needs_shared(SAMPLE)
def test_sample_reproduces_every_row(folder: Path) -> None:
    lines = (folder / "clicks.jsonl").read_bytes().splitlines()
    assert len(lines) == 50_015
    clicks = [decode_click(x) for x in lines]
    assert [c.ts for c in clicks] == sorted(c.ts for c in clicks)
    assert len({c.click_id for c in clicks}) == 50_015
    assert all(not c.logged_in and c.customer_id is None for c in clicks)
    purchases = [decode_purchase(x) for x in (folder / "purchases.jsonl").read_bytes().splitlines()]
    assert len(purchases) == 105
    by_id = {c.click_id: c for c in clicks}
    assert all(p.click_id in by_id and p.ts >= by_id[p.click_id].ts for p in purchases)
    assert not (folder / "truth.jsonl").exists()
    meta = orjson.loads((folder / "meta.json").read_bytes())
    assert meta["source"] == "talkingdata" and meta["counts"]["clicks"] == 50_015
    assert sum(meta["slice_counts"].values()) == 50_015 and meta["slice_counts"]["app:out"] > 45_000
    ds = load_dataset(folder)
    assert ds.truth is None and ds.is_bot is None and int(ds.purchased.sum()) == 105
