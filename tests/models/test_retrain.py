"""slidr retrain on what a real worker decided (issue 9): 2 simulated days of the small scenario through a worker,
then the retrain from the feature-log, clicks and purchases topics against training on the same days' folder."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

pytest.importorskip("torch")
pytest.importorskip("cvxpy")

from models.config import TrainConfig
from slidr.settings import Settings
from tests.stream import kafka_helpers as K

pytestmark = [pytest.mark.integration, pytest.mark.train]
# small and fast (tests/models/test_pipeline.py's config); no coverage floor: one small day cannot meet one
CFG = TrainConfig(epochs=12, hidden=(32, 16), progress=False, fpr_budget=0.05, coverage_floor=0.0,
                  min_slice_purchases=10)
SETS = ["--set", "epochs=12", "--set", "hidden=[32,16]", "--set", "progress=false", "--set", "fpr_budget=0.05",
        "--set", "coverage_floor=0", "--set", "min_slice_purchases=10"]
HOUR_MS = 3_600_000


def _one_partition(kenv: Any) -> Settings:
    """kenv's broker, Redis and registry with topics of one partition (names under kenv's prefix: dropped with it).

    One partition keeps the stream's arrival order the dataset's event-time order at replay speed. With 4, the IP
    stage reads its by-ip partitions unevenly, and replaying 2 days in seconds makes a second of skew hours of
    event time: 10% of rows had other IP counters than the folder's (measured), which live traffic does not see."""
    from slidr.services import create_topics

    s: Settings = kenv.settings.model_copy(update={"partitions": 1, "topic_prefix": f"{kenv.prefix}-p1",
                                                   "worker_id": f"{kenv.prefix}-p1-group"})
    create_topics(s)
    return s


def _decide(s: Settings, kenv: Any, data: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """Stream the dataset (clicks and purchases) through a worker scoring with a toy model; wait until every click
    is decided. Returns the click count."""
    from models.data.dataset import load_dataset
    from models.data.produce import produce
    from slidr.topics import Topics
    from stream import cache, toymodel
    from stream.features import build_profiles

    decisions = Topics(s.topic_prefix).decisions
    ds = load_dataset(data)
    toymodel.build_registry(s.registry_path, version="toy-it")
    cache.load(s, build_profiles(ds.customers.values(), ds.ip_ranges))
    monkeypatch.setenv("SLIDR_REDIS_TIMEOUT_S", "10")  # no degraded-mode batch on a busy machine
    w = K.start_worker(s, kenv.workdir / "w0", kenv.workdir / "w0.log")
    n = len(ds.clicks)
    try:
        asyncio.run(produce(data, settings=s))

        def tick() -> None:
            assert w.poll() is None, f"worker died with {w.returncode}; see {kenv.workdir / 'w0.log'}"

        got = asyncio.run(K.read_until(s, [decisions], lambda r: len({m.key for m in r[decisions]}) >= n, 400, tick))
        assert len({m.key for m in got[decisions]}) == n
    finally:
        K.stop(w)
    return n


def _cli(s: Settings, kenv: Any, *args: str) -> subprocess.CompletedProcess[str]:
    env = K.worker_env(s)
    env["SLIDR_CACHE_DIR"] = str(kenv.workdir / "cache")
    return subprocess.run([sys.executable, "-m", "slidr", "retrain", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_retrain_from_the_stream_matches_the_dataset_folder(kenv: Any, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from models.data.simulate import simulate_to
    from models.labels import TEST
    from models.retrain import from_dataset, from_stream, parse_window, retrain

    data = tmp_path / "small2"
    sim = simulate_to(data, "small", 1, days=2)  # with the scenario's 2-hour purchase outage on day 0, 15:00 UTC
    (o_start, o_end), = sim.meta["label_outages"]
    s = _one_partition(kenv)
    n = _decide(s, kenv, data, monkeypatch)

    # the stream never hears of the outage: the data guardrail refuses the window and names the hours
    r = _cli(s, kenv, "--window", "2d", *SETS)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL data.label_gaps" in r.stderr, r.stderr
    rec = orjson.loads(Path(r.stdout.strip().rsplit("report ", 1)[1].rstrip(")")).read_bytes())
    gaps = next(c for c in rec["report"]["checks"] if c["name"] == "label_gaps")["values"]["hours_ms"]
    assert gaps and all(o_start <= h < o_end for h in gaps), (gaps, o_start, o_end)
    assert all(f"2026-11-02 {(h - o_start) // HOUR_MS + 15:02d}:00 UTC" in r.stderr for h in gaps)
    again = _cli(s, kenv, "--window", "2d", *SETS)  # same window: nothing done, the earlier outcome again
    assert again.returncode == 1 and "already retrained: refused" in again.stdout, again.stdout + again.stderr
    print(r.stderr.strip().splitlines()[-1])

    # same features, same labels: the stream's rows against the folder's (outage undeclared there too)
    plain = tmp_path / "plain"
    shutil.copytree(data, plain)
    meta = orjson.loads((plain / "meta.json").read_bytes())
    meta["label_outages"] = []
    (plain / "meta.json").write_bytes(orjson.dumps(meta))
    cfg = CFG.replace(allow_label_gaps=True)
    live = from_stream(s, cfg, parse_window("2d"))
    folder = from_dataset(plain, cfg)
    assert live.td is not None and folder.td is not None and len(live.ts) == n == len(folder.ts)
    assert np.array_equal(live.ts, folder.ts)
    assert np.array_equal(live.td.label, folder.td.label) and np.array_equal(live.td.heavy, folder.td.heavy)
    assert np.array_equal(live.td.split, folder.td.split)
    from stream.features import FEATURE_NAMES

    same = np.all(live.x == folder.x, axis=1)
    diff = {f: (float((live.x[:, j] != folder.x[:, j]).mean()), float(np.abs(live.x[:, j] - folder.x[:, j]).max()))
            for j, f in enumerate(FEATURE_NAMES) if (live.x[:, j] != folder.x[:, j]).any()}
    print("differing columns (share of rows, max |diff|):", diff)
    print(f"{n} clicks; feature rows equal to the folder's: {same.mean():.4f}; "
          f"max |diff| {float(np.abs(live.x - folder.x).max()):.3g}")
    assert same.all()

    got = retrain(window="2d", cfg=cfg, dry_run=True, settings=s)
    want = retrain(data_dir=plain, cfg=cfg, dry_run=True, settings=s)
    assert got["status"] in ("candidate", "refused") and "evaluation" in got and "evaluation" in want
    print(f"stream retrain (dry run) against the worker's toy stable model: {got['status']} "
          f"{got['report']['failed']}")
    g, w = got["evaluation"]["overall"], want["evaluation"]["overall"]
    print("test split, stream vs folder: " + ", ".join(f"{k} {g[k]:.4f} / {w[k]:.4f}"
                                                       for k in ("ivr", "fpr", "coverage", "auc")))
    assert g["n"] == w["n"] == int(folder.td.rows(TEST).sum())
    for k in ("ivr", "fpr", "coverage", "auc"):  # same rows, same order, same seed: the same training
        assert abs(g[k] - w[k]) < 1e-6, (k, g[k], w[k])
