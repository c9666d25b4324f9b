"""Replay against the real broker and Redis: a faulty model decided the traffic, a replay with the stable model
corrects a window of it (see tests/conftest.py for ``kenv``)."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from typing import Any

import numpy as np
import orjson
import pytest

from schemas.events import Click
from stream import cache, faults, toymodel
from stream import features as F
from stream import replay as R
from stream.app import read_feature_log
from stream.billing import read_all
from stream.scoring import decision_dicts, load_model, score_batch
from tests.stream import kafka_helpers as K
from tests.stream.helpers import traffic
from tests.stream.test_worker_integration import _profiles, reference_features

pytestmark = pytest.mark.integration

N = int(os.environ.get("SLIDR_TEST_REPLAY_CLICKS", "6000"))


class Live:
    """A live run: the faulty model (ACTIVE) decided every click; the registry's STABLE model is the good one."""

    def __init__(self, kenv: Any, clicks: list[Click] | None = None, stamped: bool = False) -> None:
        s = self.s = kenv.settings
        self.kenv = kenv
        self._refs: dict[str, dict[str, bool]] = {}
        toymodel.build_registry(s.registry_path, version="toy-stable", threshold=0.7)
        toymodel.build(s.registry_path / "toy-faulty", version="toy-faulty", threshold=0.3)
        (s.registry_path / "ACTIVE").write_text("toy-faulty\n")
        self.clicks = clicks or traffic(N, seed=23)
        self.profiles = _profiles(self.clicks)
        cache.load(s, self.profiles)
        self.worker = K.start_worker(s, kenv.workdir / "w0", kenv.workdir / "w0.log")
        asyncio.run(_produce(s, kenv.topics.clicks, self.clicks, stamped))
        want = {c.click_id for c in self.clicks}
        asyncio.run(K.read_until(s, [kenv.topics.decisions], lambda r: {m.key.decode() for m in
                                 r[kenv.topics.decisions]} >= want, 300, self._alive))
        # the live IP stage's counting order per partition: its feature log's (test_worker_integration)
        self.counted = asyncio.run(K.read_partitions(s, kenv.topics.feature_log, 30))
        clicks_msgs = asyncio.run(K.read_partitions(s, kenv.topics.clicks, 30))
        self.position = {orjson.loads(m.value)["click_id"]: (p, m.offset) for p, ms in clicks_msgs.items()
                         for m in ms}
        self.ends = {p: len(ms) for p, ms in clicks_msgs.items()}

    def _alive(self) -> None:
        assert self.worker.poll() is None, f"worker died; see {self.kenv.workdir}"

    def window(self) -> tuple[str, str, set[str]]:
        """The middle third of every partition, as --from/--to offsets, and its click ids."""
        lo = {p: e // 3 for p, e in self.ends.items()}
        hi = {p: 2 * e // 3 for p, e in self.ends.items()}
        ids = {cid for cid, (p, o) in self.position.items() if lo[p] <= o < hi[p]}
        return (",".join(f"{p}:{o}" for p, o in lo.items()), ",".join(f"{p}:{o}" for p, o in hi.items()), ids)

    def reference(self, version: str) -> dict[str, bool]:
        """What ``version`` decides for every click run from the start: offline features in the live arrival
        order (equal to the live feature log: test_worker_integration), scored."""
        if version in self._refs:
            return self._refs[version]
        feats = reference_features(self.clicks, self.counted, self.profiles)
        order = [c for c in self.clicks if c.click_id in feats]
        model = load_model(self.s.registry_path / version)
        scores = score_batch(model, np.stack([feats[c.click_id] for c in order]))
        got = self._refs[version] = {d["click_id"]: d["valid"] for d in decision_dicts(model, order, scores,
                                                                                        decided_at=1)}
        return got

    def live_features(self) -> dict[str, np.ndarray]:
        fl = asyncio.run(K.read_partitions(self.s, self.kenv.topics.feature_log, 30))
        out: dict[str, np.ndarray] = {}
        for ms in fl.values():
            for m in ms:
                for r in read_feature_log(m.value):
                    out.setdefault(r["click_id"], np.asarray(r["features"], dtype=np.float32))
        return out

    def decisions(self) -> list[dict[str, Any]]:
        parts = asyncio.run(K.read_partitions(self.s, self.kenv.topics.decisions, 30))
        return [orjson.loads(m.value) for ms in parts.values() for m in ms]

    def untouched_state(self) -> tuple[Any, ...]:
        """The live worker's state: its changelogs' and by-ip's end offsets and its group's commits."""
        s, p = self.s, self.kenv.prefix
        names = [f"{p}.{s.worker_id}.users-changelog", f"{p}.{s.worker_id}.ips-changelog", f"{p}.by-ip"]
        return (tuple(tuple(sorted(asyncio.run(K.end_offsets(s, n)).items())) for n in names),
                tuple(sorted(asyncio.run(K.committed_offsets(s, s.worker_id, self.kenv.topics.clicks)).items())))

    def stop(self) -> None:
        K.stop(self.worker)


def _billing_view(live: Live, window: set[str], faulty: dict[str, bool]) -> None:
    """In the window billing holds the stable model's decisions; outside it the faulty live ones, untouched."""
    stable = live.reference("toy-stable")
    led = read_all(live.s, idle_s=2.0)
    assert set(led.latest) == set(stable)
    wrong_in = [c for c in window if led.latest[c].valid != stable[c]]
    assert not wrong_in, f"{len(wrong_in)} clicks of the window differ from the stable model, e.g. {wrong_in[:3]}"
    outside = [c for c in stable if c not in window]
    assert all(led.latest[c].revision == 0 and led.latest[c].valid == faulty[c] for c in outside)
    flipped = sum(stable[c] != faulty[c] for c in window)
    assert flipped > 0, "the faulty model must differ from the stable one somewhere in the window"
    print(f"window {len(window)} clicks, {flipped} decisions corrected")


def test_rescore_corrects_the_window_idempotent_and_resumable(kenv: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    live = Live(kenv)
    try:
        s = live.s
        frm, to, window = live.window()
        faulty = live.reference("toy-faulty")
        before_state = live.untouched_state()
        n_before = len(live.decisions())

        # the model that decided the range changes nothing
        same = R.replay(s, frm, to, model="toy-faulty")
        assert same.tally.published == 0 and same.tally.considered == len(window)

        dry = R.replay(s, frm, to, dry_run=True)  # the stable model by default
        assert len(live.decisions()) == n_before  # a dry run publishes nothing
        stable = live.reference("toy-stable")
        flips = sum(stable[c] != faulty[c] for c in window)
        dj = dry.tally.to_json()
        assert dj["to_invalid"] + dj["to_valid"] == dry.tally.published == flips
        by_adv: Counter[str] = Counter()
        for row in dj["per_slice_advertiser"]:
            by_adv[row["advertiser"]] += row["to_invalid"] + row["to_valid"]
        assert sum(by_adv.values()) == flips

        # interrupted after its second acknowledged chunk, then run again: resumed from the checkpoint
        monkeypatch.setattr(R, "CHUNK", 100)
        monkeypatch.setattr(faults, "_POINTS", faults._parse("replay.publish@2"))
        with pytest.raises(faults.InjectedFault):
            R.replay(s, frm, to)
        monkeypatch.setattr(faults, "_POINTS", {})
        first = [d for d in live.decisions() if d["replay_id"] == dry.replay_id]
        assert 0 < len(first) < flips
        done = R.replay(s, frm, to)
        assert done.replay_id == dry.replay_id and done.tally.published == flips - len(first)
        mine = Counter(d["click_id"] for d in live.decisions() if d["replay_id"] == dry.replay_id)
        assert len(mine) == flips and set(mine.values()) == {1}, "a click missing or published twice"
        assert all(d["revision"] == 1 for d in live.decisions() if d["replay_id"] == dry.replay_id)
        _billing_view(live, window, faulty)

        # the same replay again: complete (its checkpoint), and without the checkpoint: its id rule
        again = R.replay(s, frm, to)
        assert again.status == "complete" and again.tally.published == 0
        restarted = R.replay(s, frm, to, restart=True)
        assert restarted.tally.published == 0 and restarted.tally.already == flips
        assert len(live.decisions()) == n_before + flips
        assert live.untouched_state() == before_state  # the live tables and group were never written
        recs = R.records(s)
        assert [r["status"] for r in recs] == ["done", "dry-run", "interrupted", "done", "complete", "done"]
        assert all(r["by"] and r["range"] for r in recs)
    finally:
        live.stop()


def test_recompute_equals_the_live_features_and_corrects_the_window(kenv: Any) -> None:
    live = Live(kenv)
    try:
        s = live.s
        frm, to, window = live.window()
        faulty = live.reference("toy-faulty")
        before_state = live.untouched_state()
        # with the model that decided it: nothing changes
        same = R.replay(s, frm, to, model="toy-faulty", mode="recompute")
        assert same.tally.published == 0 and same.tally.considered == len(window)
        res = R.replay(s, frm, to, mode="recompute")
        print(res.to_json() | {"counts": None})
        assert res.extra["own_order_clicks"] == 0
        feats = live.live_features()
        assert set(res.features) == window
        bad = [c for c in window if not np.array_equal(np.asarray(res.features[c], dtype=np.float32), feats[c])]
        assert not bad, f"{len(bad)} recomputed feature vectors differ from the live ones, e.g. {bad[0]}"
        # the warm-up mattered: computed from the range alone, the first clicks' counters would differ
        order = [c for c in live.clicks if c.click_id in window]  # (produced order: any would do here)
        cold = F.featurize(order, live.profiles)
        differ = sum(not np.array_equal(cold[i], feats[c.click_id]) for i, c in enumerate(order[:200]))
        assert differ > 0
        _billing_view(live, window, faulty)
        assert live.untouched_state() == before_state
        left = [t for t in asyncio.run(_topics(s)) if t.startswith(kenv.prefix) and ".replay-" in t]
        assert not left, f"the replay's topics were left behind: {left}"
    finally:
        live.stop()


async def _produce(s: Any, topic: str, clicks: list[Click], stamped: bool) -> None:
    """Clicks keyed by user key; ``stamped``: each record's timestamp is its click's event time."""
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(linger_ms=5, max_batch_size=256 * 1024, **s.kafka_client_kwargs())
    await p.start()
    try:
        futs = [await p.send(topic, key=c.user_key.encode(), value=c.to_json(),
                             timestamp_ms=c.ts if stamped else None) for c in clicks]
        await asyncio.gather(*futs)
    finally:
        await p.stop()


def test_recompute_warm_up_starts_a_day_before_the_range_by_time(kenv: Any) -> None:
    """Two bursts of traffic 30 h apart in event time (records stamped with it): a replay of the second burst by
    time reads from the second burst only (the first is older than the warm-up), and its features near the
    range's start still equal the live ones (their counters hold the second burst's earlier clicks)."""
    now = int(time.time() * 1000)
    a = traffic(N // 2, seed=29)
    b = traffic(N // 2, seed=31)
    shift = now - 40 * F.HOUR_MS - a[0].ts
    clicks = [c.model_copy(update={"ts": c.ts + shift}) for c in a]
    clicks += [c.model_copy(update={"ts": c.ts + shift + 30 * F.HOUR_MS, "click_id": "b" + c.click_id}) for c in b]
    live = Live(kenv, clicks, stamped=True)
    try:
        s = live.s
        second = [c for c in clicks if c.click_id.startswith("b")]
        frm = str(second[len(second) // 3].ts)  # the range: from a third into the second burst, to its end
        res = R.replay(s, frm, str(now), mode="recompute", model="toy-faulty")
        first_b = {p: min(o for cid, (q, o) in live.position.items() if q == p and cid.startswith("b"))
                   for p in live.ends}
        assert res.extra["warmup_start"] == {str(p): o for p, o in first_b.items()}, "the warm-up must skip burst a"
        assert res.tally.published == 0  # the model that decided it
        feats = live.live_features()
        assert res.features and set(res.features) <= {c.click_id for c in second}
        bad = [c for c in res.features if not np.array_equal(np.asarray(res.features[c], dtype=np.float32),
                                                              feats[c])]
        assert not bad, f"{len(bad)} of {len(res.features)} recomputed feature vectors differ, e.g. {bad[:3]}"
        print(f"range {len(res.features)} clicks, warm-up from {res.extra['warmup_start']} (burst a skipped)")
    finally:
        live.stop()


async def _topics(s: Any) -> list[str]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**s.kafka_client_kwargs())
    await admin.start()
    try:
        return list(await admin.list_topics())
    finally:
        await admin.close()

