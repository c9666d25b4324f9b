"""The generic table importer: CSV, JSON lines and Parquet files written here with odd column names and bad rows,
and the TalkingData sample through the generic path (same dataset as ``slidr import talkingdata``)."""

from __future__ import annotations

import csv
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from models.data.dataset import load_dataset
from models.data.table import MappingError, import_table, parse_mapping, parse_ts
from models.data.talkingdata import import_talkingdata
from slidr.cli import app
from tests.conftest import TALKINGDATA_CSV, needs_shared
from tests.models.data.test_talkingdata import ROWS, _write_csv

MAPPING = "click_id=Click ID,ts=When (UTC),ip=Remote Addr,session_id=visitor,customer_id=Member #,platform=Device," \
          "ad_id=creative,campaign_id=camp,advertiser_id==acme,cpc=Price"
HEADER = ["Click ID", "When (UTC)", "Remote Addr", "visitor", "Member #", "Device", "creative", "camp", "Price"]
T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z
# (row, expected reason or None); times in three notations, one row per kind of trouble
ROWS_ODD = [
    (["k3", "2023-11-14T22:13:22Z", "10.1.2.3", "v1", "", "mobile", "cr1", "c1", "0.5"], None),
    (["k1", str(T0 // 1000), "10.1.2.3", "v1", "", "Mobile", "cr1", "c1", "0.5"], None),
    (["k2", str(T0 + 1000), "2001:db8::1", "v2", "m77", "desktop", "cr2", "c1", "1.25"], None),
    (["k4", "yesterday", "10.1.2.4", "v3", "", "app", "cr1", "c1", "0.5"], "ts: not a time"),
    (["k5", str(T0), "999.1.1.1", "v3", "", "app", "cr1", "c1", "0.5"], "ip: not an IPv4/IPv6 address"),
    (["k6", str(T0), "10.1.2.5", "v3", "", "tv", "cr1", "c1", "0.5"], "platform"),
    (["", str(T0), "10.1.2.5", "v3", "", "app", "cr1", "c1", "0.5"], "click_id: empty"),
    (["k1", str(T0), "10.1.2.5", "v3", "", "app", "cr1", "c1", "0.5"], "click_id: duplicate"),
    (["k7", str(T0), "10.1.2.5", "v3", "", "app", "cr1", "c1", "lots"], "cpc: not a number"),
]


def _odd_csv(path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        w.writerows(r for r, _ in ROWS_ODD)
    return path


def _check_odd(out: Path, meta: dict) -> None:  # type: ignore[type-arg]
    ds = load_dataset(out)
    assert [c.click_id for c in ds.clicks] == ["k1", "k2", "k3"]  # sorted by time, not file order
    assert [c.ts for c in ds.clicks] == [T0, T0 + 1000, T0 + 2000]
    k1, k2, _ = ds.clicks
    assert (k1.platform, k1.slice, k1.customer_id, k1.advertiser_id, k1.cpc) == ("mobile", "mobile:out", None,
                                                                                 "acme", 0.5)
    assert (k2.ip, k2.slice, k2.customer_id, k2.session_id) == ("2001:db8::1", "desktop:in", "m77", "v2")
    assert ds.purchases == [] and ds.truth is None
    rejects = [orjson.loads(x) for x in (out / "rejects.jsonl").read_bytes().splitlines()]
    want = [(i + 1, why) for i, (_, why) in enumerate(ROWS_ODD) if why]
    assert [(r["row"], r["reason"]) for r in rejects] == [(r, rj["reason"]) for (r, _), rj in zip(want, rejects,
                                                                                                    strict=True)]
    for (_, why), rj in zip(want, rejects, strict=True):
        assert rj["reason"].startswith(why), rj
    assert rejects[0]["row_data"]["When (UTC)"] == "yesterday"
    assert meta["counts"]["clicks"] == 3 and meta["rejected"]["rows"] == len(want)
    assert sum(meta["rejected"]["reasons"].values()) == len(want)


def test_csv_with_odd_columns_bad_rows_and_no_purchases(tmp_path: Path) -> None:
    src = _odd_csv(tmp_path / "my clicks.csv")
    meta = import_table([src], tmp_path / "out", parse_mapping(MAPPING))
    _check_odd(tmp_path / "out", meta)
    assert meta["source"] == "table" and meta["inputs"][0]["file"] == "my clicks.csv"


def test_parquet_and_json_lines_give_the_same_dataset(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {h: [r[i] for r, _ in ROWS_ODD] for i, h in enumerate(HEADER)}
    # typed columns as a platform would export them: epoch seconds / ISO strings stay text here (mixed),
    # the price is a float column with a null for the bad value
    cols["Price"] = [None if p == "lots" else float(p) for p in cols["Price"]]
    pq.write_table(pa.table(cols), tmp_path / "clicks.parquet")
    meta = import_table([tmp_path / "clicks.parquet"], tmp_path / "pq", parse_mapping(MAPPING))
    ds = load_dataset(tmp_path / "pq")
    # the null price is no error (cpc is optional): k7 comes in at cpc 0 (after k1: same time, later row)
    assert [c.click_id for c in ds.clicks] == ["k1", "k7", "k2", "k3"]
    assert ds.clicks[1].cpc == 0.0 and meta["rejected"]["rows"] == 5

    lines = [orjson.dumps({h: r[i] for i, h in enumerate(HEADER)}) for r, _ in ROWS_ODD]
    (tmp_path / "clicks.jsonl").write_bytes(b"\n".join([*lines, b"{not json"]) + b"\n")
    meta = import_table([tmp_path / "clicks.jsonl"], tmp_path / "js", parse_mapping(MAPPING))
    rejects = [orjson.loads(x) for x in (tmp_path / "js" / "rejects.jsonl").read_bytes().splitlines()]
    assert rejects[-1]["row"] == len(ROWS_ODD) + 1 and rejects[-1]["reason"].startswith("row: not valid JSON")
    js = load_dataset(tmp_path / "js")
    assert [c.click_id for c in js.clicks] == ["k1", "k2", "k3"]
    assert [c.model_dump() for c in js.clicks] == [c.model_dump() for c in ds.clicks if c.click_id != "k7"]


def test_purchases_file_attributed_by_click_id(tmp_path: Path) -> None:
    src = _odd_csv(tmp_path / "clicks.csv")
    (tmp_path / "conv.csv").write_text("order,clicked,at_ms,value\n"
                                       f"o1,k2,{T0 + 60_000},12.5\n"
                                       f"o2,nope,{T0 + 60_000},1\n"
                                       f"o3,k1,{T0 + 30_000},\n")
    meta = import_table([src], tmp_path / "out", parse_mapping(MAPPING), purchases=[tmp_path / "conv.csv"],
                        purchase_mapping=parse_mapping("purchase_id=order,click_id=clicked,ts=at_ms,"
                                                       "amount=value,ts_format=epoch_ms"))
    ds = load_dataset(tmp_path / "out")
    assert [(p.purchase_id, p.click_id, p.ts, p.amount) for p in ds.purchases] == [
        ("o3", "k1", T0 + 30_000, 0.0), ("o1", "k2", T0 + 60_000, 12.5)]
    rejects = [orjson.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_bytes().splitlines()]
    assert [(r["file"], r["row"], r["reason"]) for r in rejects if r["file"] == "conv.csv"] == [
        ("conv.csv", 2, "click_id: not among the imported clicks")]
    assert meta["counts"]["purchases"] == 2


def test_timestamps_and_mapping_errors(tmp_path: Path) -> None:
    assert parse_ts(1_700_000_000) == parse_ts("1700000000") == parse_ts(1_700_000_000_000) == T0
    assert parse_ts("1700000000.5", "epoch_s") == T0 + 500
    assert parse_ts("2023-11-14T23:13:20+01:00") == parse_ts("2023-11-14 22:13:20") == T0
    assert parse_ts("14/11/2023 22:13", "%d/%m/%Y %H:%M") == T0 - 20_000
    # Parquet timestamp columns come as datetimes (naive = UTC)
    assert parse_ts(datetime(2023, 11, 14, 22, 13, 20)) == parse_ts(datetime(2023, 11, 14, 22, 13, 20,
                                                                              tzinfo=UTC)) == T0
    with pytest.raises(MappingError, match="must give"):
        import_table([_odd_csv(tmp_path / "c.csv")], tmp_path / "o", parse_mapping("click_id=Click ID"))
    with pytest.raises(MappingError, match="does not have"):
        import_table([tmp_path / "c.csv"], tmp_path / "o", parse_mapping(MAPPING.replace("=Device", "=device")))
    with pytest.raises(MappingError, match="unknown mapping keys"):
        import_table([tmp_path / "c.csv"], tmp_path / "o", parse_mapping(MAPPING + ",colour=red"))


def test_cli_prints_the_rejects(tmp_path: Path) -> None:
    src = _odd_csv(tmp_path / "clicks.csv")
    r = CliRunner().invoke(app, ["import", "table", str(src), "--map", MAPPING, "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "3 clicks, 0 purchases" in r.output and "rejected 6 rows" in r.output
    assert "click_id: duplicate" in r.output
    r = CliRunner().invoke(app, ["import", "table", str(src), "--map", "ts=x", "--out", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "must give" in r.output


MAPPINGS = Path(__file__).resolve().parents[3] / "models" / "data" / "mappings"


def test_talkingdata_rules_through_the_generic_path(tmp_path: Path) -> None:
    src = _write_csv(tmp_path / "td.csv", ROWS)
    import_talkingdata(src, tmp_path / "td")
    meta = import_table([src], tmp_path / "gen", parse_mapping(MAPPINGS / "talkingdata.toml"))
    for f in ("clicks.jsonl", "purchases.jsonl"):
        assert (tmp_path / "gen" / f).read_bytes() == (tmp_path / "td" / f).read_bytes(), f
    assert meta["rejected"]["rows"] == 0


@needs_shared(TALKINGDATA_CSV)
def test_talkingdata_sample_through_the_generic_path(tmp_path: Path) -> None:
    import_talkingdata(TALKINGDATA_CSV, tmp_path / "td")
    meta = import_table([TALKINGDATA_CSV], tmp_path / "gen", parse_mapping(MAPPINGS / "talkingdata.toml"))
    assert meta["counts"]["clicks"] == 50_015 and meta["counts"]["purchases"] == 105
    assert meta["rejected"] == {"rows": 0, "reasons": {}}
    for f in ("clicks.jsonl", "purchases.jsonl"):
        assert (tmp_path / "gen" / f).read_bytes() == (tmp_path / "td" / f).read_bytes(), f
