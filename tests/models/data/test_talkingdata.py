"""The TalkingData importer on the shared sample (50,015 rows, 105 attributed)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from models.data.dataset import load_dataset
from models.data.talkingdata import convert_rows, import_talkingdata, platform_of
from schemas.events import decode_click, decode_purchase
from tests.conftest import TALKINGDATA_CSV

SAMPLE = TALKINGDATA_CSV


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("td")
    import_talkingdata(SAMPLE, out)
    return out


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
