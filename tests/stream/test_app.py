"""The worker's pure helpers (stream/app.py), without Kafka."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import rocksdict

from schemas.events import Click
from stream import features as F
from stream.app import ClickView, TableWriter, _state_hi, feature_log_record, ip_partition, read_feature_log
from stream.publish import Publisher
from stream.synth import T0
from tests.stream.helpers import click, traffic
from tests.stream.stage_harness import table_writer


def test_click_view_reads_like_the_click() -> None:
    for c in [*traffic(200, seed=4), click(1, T0, customer="cu"), click(2, T0 + 6, tz=60)]:
        d = orjson.loads(c.to_json())
        d.pop("cpc")  # a producer may leave out fields with defaults
        v = ClickView(d)
        for name in Click.model_fields:
            want = 0.0 if name == "cpc" else getattr(c, name)
            assert getattr(v, name) == want, name
        assert v.user_key == c.user_key and v.slice == c.slice


def test_state_hi_reads_the_front_of_a_state_and_falls_back_to_parsing() -> None:
    st, _ = F.update_user(None, click(1, 1_700_000_123_456))
    raw = orjson.dumps(st)
    assert raw.startswith(b'{"hi":') and _state_hi(raw) == 1_700_000_123_456
    assert _state_hi(orjson.dumps({"m": [], "hi": 42})) == 42  # another key order: parsed
    ip, _ = F.update_ip(None, click(2, T0 + 77))
    assert _state_hi(orjson.dumps(ip)) == T0 + 77
    combo, _ = F.update_combo(None, click(3, T0 + 78))  # kept in the ips table too: swept by the same rule
    assert orjson.dumps(combo).startswith(b'{"hi":') and _state_hi(orjson.dumps(combo)) == T0 + 78


def test_a_partition_count_that_splits_a_combination_shard_is_refused(tmp_path: Path) -> None:
    """The IP stage keeps the user agent x ad counters per shard of IPs (features.update_combo): with a partition
    count that does not divide COMBO_SHARDS a shard's clicks would be counted by several partitions apart."""
    from slidr.settings import Settings
    from stream.app import create_app

    for partitions in (3, 8):  # a divisor of the earlier 12 shards; a multiple of the 4
        with pytest.raises(ValueError, match=r"must divide 4 \(one of \[1, 2, 4\]\)"):
            create_app(Settings(partitions=partitions, home=tmp_path))
    with pytest.raises(ValueError, match=r"combo_shards=12 in these settings, but this process's features use 4"):
        create_app(Settings(home=tmp_path, combo_shards=12))  # (the features read the environment's, once)


def test_a_model_trained_with_12_shards_lets_the_worker_run_3_partitions(tmp_path: Path) -> None:
    """SLIDR_COMBO_SHARDS=12 (a process set up with it, and a model trained with it): 3 partitions, refused with
    4 shards, now build the app; 8 still split a shard."""
    code = f"""
import pytest
from pathlib import Path
from slidr.settings import Settings
from stream import toymodel
from stream.app import create_app
d = toymodel.build(Path({str(tmp_path)!r}) / "m12")
create_app(Settings(partitions=3, home=Path({str(tmp_path)!r}) / "h"), model_dir=d)
with pytest.raises(ValueError, match=r"must divide 12 \\(one of \\[1, 2, 3, 4, 6, 12\\]\\)"):
    create_app(Settings(partitions=8, home=Path({str(tmp_path)!r}) / "h"), model_dir=d)
print("ok")
"""
    env = {**os.environ, "SLIDR_COMBO_SHARDS": "12"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    assert out.returncode == 0 and out.stdout.splitlines()[-1] == b"ok", out.stderr.decode()[-3000:]


def test_ip_partition_is_stable_and_spreads() -> None:
    ips = [f"10.0.{i // 256}.{i % 256}" for i in range(2000)]
    parts = [ip_partition(ip, 4) for ip in ips]
    assert parts == [ip_partition(ip, 4) for ip in ips]
    assert all(parts.count(p) > 350 for p in range(4))


def test_feature_log_record_round_trips() -> None:
    cs = traffic(3, seed=1)
    rows = [[float(i), 0.5] for i in range(3)]
    back = read_feature_log(feature_log_record("v9", cs, rows, [0.1, 0.2, 0.3]))
    assert [r["click_id"] for r in back] == [c.click_id for c in cs]
    assert [r["features"] for r in back] == rows and [r["score"] for r in back] == [0.1, 0.2, 0.3]
    assert {r["model_version"] for r in back} == {"v9"} and back[0]["feature_spec_hash"] == F.FEATURE_SPEC_HASH
    assert [r["ts"] for r in back] == [c.ts for c in cs]


def _writer(tmp_path: Path) -> tuple[TableWriter, dict[int, rocksdict.Rdict]]:
    """A TableWriter over real RocksDB databases (one per partition), as Faust's store would hold them."""
    return table_writer(tmp_path, "t")


def test_rocksdb_memory_is_rocksdb_s_own_accounting_over_the_open_stores(tmp_path: Path) -> None:
    """``memory`` sums RocksDB's properties over every open partition store: states written go into the
    memtables (so they grow), a flush moves them into sst files on disk and empties the memtables."""
    from aiokafka import AIOKafkaProducer

    async def main() -> None:
        cl, dbs = _writer(tmp_path)
        assert cl.memory() == dict.fromkeys(("memtables", "block_cache", "table_readers", "sst_files"), 0)
        prod = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1")
        for p in (0, 1):
            for i in range(200):
                st, _ = F.update_user(None, click(i, T0 + i))
                cl.put(p, f"k{i:03d}".encode(), st)
        cl.write(Publisher(lambda: prod, lambda topic: 1))
        before = cl.memory()
        one = int(dbs[0].property_int_value("rocksdb.cur-size-all-mem-tables"))
        assert before["memtables"] > one > 0 and before["sst_files"] == 0, before
        dbs[0].flush()
        after = cl.memory()
        assert after["memtables"] < before["memtables"] and after["sst_files"] > 0, after
        await prod.stop()

    asyncio.run(main())


def test_sweep_deletes_idle_keys_going_round_the_partition(tmp_path: Path) -> None:
    async def main() -> None:
        from aiokafka import AIOKafkaProducer

        cl, dbs = _writer(tmp_path)
        now = T0 + 10 * F.DAY_MS
        idle = {f"k{i:02d}".encode() for i in range(0, 40, 3)}
        for i in range(40):  # every third key idle for longer than TTL + grace
            st, _ = F.update_user(None, click(i, now - (F.TTL_MS + F.EXPIRY_GRACE_MS + 1 if i % 3 == 0 else 5)))
            cl.put(0, f"k{i:02d}".encode(), st)
        prod = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1")
        pub = Publisher(lambda: prod, lambda topic: 1)
        cl.write(pub)
        assert len(list(dbs[0].keys())) == 40 and pub._open  # written, with changelog records
        cl.sweep(0, T0, 35)  # an earlier clock: nothing idle yet; the next sweep starts at the 36th key
        assert not cl.pending
        cl.sweep(0, now, 40)  # k35..k39, then round from the start to k34: the whole partition
        assert {k for (_, k), v in cl.pending.items() if v is None} == idle
        assert cl.get(0, next(iter(idle))) is None  # a pending delete reads as absent
        pub = Publisher(lambda: prod, lambda topic: 1)
        cl.write(pub)
        assert set(dbs[0].keys()) == {f"k{i:02d}".encode() for i in range(40)} - idle
        (batch,) = pub._open.values()
        assert batch.record_count() == len(idle)  # one tombstone per deleted key
        cl.sweep(0, now, 1000)  # nothing left to delete; a budget larger than the partition stops after a round
        assert not cl.pending
        await prod.stop()

    asyncio.run(main())
