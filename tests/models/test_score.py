"""``slidr score``: files made here (odd column names, bad rows, no purchases) go through ``slidr import table``
and ``slidr score``; the scores and decisions equal what the stream's scorer gives the same clicks in the same
order."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from models.data.dataset import load_dataset
from models.data.table import import_table, parse_mapping
from models.score import COLUMNS, score_dataset
from slidr.cli import app
from stream import features as F
from stream import scoring, toymodel
from stream.synth import traffic

HEADER = ["ID", "Time (ms)", "Client IP", "Visitor", "Account", "Kind", "Ad", "Campaign", "Adv"]
MAPPING = ("click_id=ID,ts=Time (ms),ts_format=epoch_ms,ip=Client IP,session_id=Visitor,customer_id=Account,"
           "platform=Kind,ad_id=Ad,campaign_id=Campaign,advertiser_id=Adv")


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    """600 synthetic clicks (hot bots, shared gateways, late arrivals) in file order, plus two bad rows."""
    rows = [[c.click_id, str(c.ts), c.ip, c.session_id, c.customer_id or "", c.platform, c.ad_id, c.campaign_id,
             c.advertiser_id] for c in traffic(600, seed=4)]
    rows.insert(100, ["bad-ts", "soon", "10.0.0.1", "v", "", "app", "a", "c", "x"])
    rows.insert(200, ["bad-ip", "1700000000000", "not-an-ip", "v", "", "app", "a", "c", "x"])
    path = tmp_path / "export.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        w.writerows(rows)
    return path


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return toymodel.build_registry(tmp_path / "registry", threshold=0.25)


def stream_decisions(model_dir: Path, data: Path, batch: int = 37) -> list[dict]:  # type: ignore[type-arg]
    """The stream's path, written out here: per-click state updates with upstream positions (as the worker
    applies them), profiles looked up in the cache content, scoring batches of ``batch`` clicks."""
    from stream.cache import profiles_from_dir

    m = scoring.load_model(model_dir)
    profiles = profiles_from_dir(data)
    users: dict[str, F.State] = {}
    ips: dict[str, F.State] = {}
    combos: dict[str, F.State] = {}
    out: list[dict] = []  # type: ignore[type-arg]
    clicks = load_dataset(data).clicks
    for i in range(0, len(clicks), batch):
        chunk, rows = clicks[i:i + batch], []
        for j, c in enumerate(chunk, start=i):
            users[c.user_key], uf = F.update_user(users.get(c.user_key), c, (0, j))
            ips[c.ip], ipf = F.update_ip(ips.get(c.ip), c, (0, j))
            k = F.combo_key(c)
            combos[k], xf = F.update_combo(combos.get(k), c, (0, j), *F.is_new(uf, ipf))
            rows.append(F.assemble(c, uf, ipf, xf, F.lookup_profile(c, profiles.get)))
        x = np.asarray(rows, dtype=np.float32)
        out += scoring.decision_dicts(m, chunk, scoring.score_batch(m, x), decided_at=0, features=x)
    return out


def test_import_then_score_equals_the_stream(csv_file: Path, model: Path, tmp_path: Path) -> None:
    meta = import_table([csv_file], tmp_path / "data", parse_mapping(MAPPING))
    assert meta["counts"] == {"clicks": 600, "purchases": 0, "customers": 0, "ip_ranges": 0}
    assert sorted(meta["rejected"]["reasons"]) == ["ip: not an IPv4/IPv6 address", "ts: not a number"]

    summary = score_dataset(tmp_path / "registry", tmp_path / "data", tmp_path / "scores.parquet")
    got = pq.read_table(tmp_path / "scores.parquet").to_pydict()
    assert tuple(got) == COLUMNS
    want = stream_decisions(model, tmp_path / "data")
    assert got["click_id"] == [d["click_id"] for d in want] == [c.click_id for c in load_dataset(
        tmp_path / "data").clicks]
    assert got["score"] == [d["score"] for d in want]
    assert got["valid"] == [d["valid"] for d in want] and got["threshold"] == [d["threshold"] for d in want]
    # reason codes too, although slidr score batches the clicks otherwise (256 against 37 here)
    assert got["reason"] == [d["reason"] for d in want]
    n_invalid = sum(not v for v in got["valid"])
    assert all("; pushed by " in r for r, v in zip(got["reason"], got["valid"], strict=True) if not v)
    assert 0 < n_invalid < 600  # the threshold splits this traffic: the comparison means something

    assert summary["model_version"] == "toy-1" and summary["clicks"] == 600 and not summary["has_purchases"]
    assert summary["overall"]["ivr"] == pytest.approx(n_invalid / 600)
    assert summary["overall"]["fpr"] is None  # no purchases: no FPR
    for sl, r in summary["slices"].items():
        assert r["fpr"] is None and r["n"] == got["slice"].count(sl)
        assert (r["coverage"] is None) == (r["n_robotic"] == 0)


def test_cli_score_csv_output(csv_file: Path, model: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["import", "table", str(csv_file), "--map", MAPPING, "--out", str(tmp_path / "d")])
    assert r.exit_code == 0 and "rejected 2 rows" in r.output, r.output
    r = CliRunner().invoke(app, ["score", str(model), str(tmp_path / "d"), "--out", str(tmp_path / "s.csv"), "--json"])
    assert r.exit_code == 0, r.output
    summary = orjson.loads(r.output[r.output.index("{"):])
    with open(tmp_path / "s.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 600 and tuple(rows[0]) == COLUMNS
    assert sum(x["valid"] == "false" for x in rows) == round(summary["overall"]["ivr"] * 600)
    assert {x["purchased"] for x in rows} == {"false"}
    r = CliRunner().invoke(app, ["score", str(model), str(tmp_path / "d"), "--out", str(tmp_path / "s.txt")])
    assert r.exit_code == 1 and ".csv or .parquet" in r.output
    mf = model / "manifest.json"  # the toy manifest's config is its weights, not a TrainConfig: evaluate reads one
    mf.write_bytes(orjson.dumps({**orjson.loads(mf.read_bytes()), "config": {}}))
    r = CliRunner().invoke(app, ["evaluate", str(model), str(tmp_path / "d")])  # no purchases: no weak labels
    assert r.exit_code == 1 and "only weak label" in r.output and "slidr score" in r.output, r.output
