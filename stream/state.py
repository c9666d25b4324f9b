"""Table state of the worker's stages: a per-batch transaction over a Faust table (``TableWriter``), the light view
of an already validated click (``ClickView``), and the per-key redelivery rule (``apply``).

Redelivery (at-least-once). A stage can see a click again: after a crash or a failed batch its input offsets
were not committed, so Faust redelivers them, while its table state (local store, changelog) may already hold
them. A repeated decision must equal the first, so a batch's outputs (by-ip records, decisions, feature log,
dead letters) are acknowledged by Kafka BEFORE its table state is written (``stages.Stage.commit_batch``). Then a
redelivered click is one of two cases: its key's state does not hold it, and it is computed again from the very
state it saw the first time (the functions are pure: the same features, the same outputs); or the state holds it,
and its outputs are in Kafka already: it is a copy, and nothing is sent again (``apply`` answers None).
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace
from typing import Any

import orjson
import rocksdict
from faust.types import TP

from schemas.events import Click, ClickKeys
from stream import features as F
from stream.publish import Publisher

_MISSING = object()
# RocksDB's own accounting of a store, in bytes (``TableWriter.memory``): the first three are memory, the last disk
ROCKSDB_PROPERTIES = {"memtables": "rocksdb.cur-size-all-mem-tables",
                      "block_cache": "rocksdb.block-cache-usage",
                      "table_readers": "rocksdb.estimate-table-readers-mem",
                      "sst_files": "rocksdb.total-sst-files-size"}


class ClickView(SimpleNamespace, ClickKeys):
    """An already validated click (a forwarded dict) with Click's attributes, without building a model again
    (``Click.model_construct`` was 5 us a click on the hot path). Fields a producer left out get their
    defaults, as a Click would."""

    def __init__(self, d: dict[str, Any]) -> None:
        super().__init__(**{**_CLICK_DEFAULTS, **d})


_CLICK_DEFAULTS = {k: f.default for k, f in Click.model_fields.items() if not f.is_required()}


def _state_hi(v: bytes) -> int:
    """A stored state's newest event time: read from the front of the JSON without parsing it all (states are
    written with "hi" first), else parsed."""
    if v.startswith(b'{"hi":'):
        end = v.find(b",", 6)
        if end > 6 and v[6:end].isdigit():
            return int(v[6:end])
    return int(orjson.loads(v)["hi"])


class TableWriter:
    """A Faust table's writes, kept in memory until ``write`` puts them in the local store (one RocksDB write
    batch per partition) and into a Publisher for the changelog (see ``stream/app.py``'s module doc).

    States are JSON objects (``features.State``), kept decoded while pending: a key clicked several times in a
    batch (a bot, a gateway IP) is parsed and serialized once. ``put(partition, key, state)`` takes the partition
    of the event being processed, as ``table[key] = value`` would (``state`` None deletes); ``get`` sees every put
    at once. ``write`` adds the latest state of every key put since the last write, one changelog record per key
    (a tombstone for a delete); ``persisted`` records, once the producer acknowledges a changelog batch, the
    offset up to which the store holds the changelog (as Faust's own ``_on_changelog_sent`` does), so a restart
    replays only newer changelog records. ``sweep`` deletes keys idle for longer than the state's TTL
    (``features.is_expired``), a slice of a partition at a time. ``discard`` drops what a failed batch put.
    """

    def __init__(self, table: Any) -> None:
        self.store = table.data  # faust.stores.rocksdb.Store
        self.topic: str = table.changelog_topic.get_topic_name()
        self.pending: dict[tuple[int, bytes], F.State | None] = {}
        self.cursor: dict[int, bytes] = {}  # partition -> the key the next sweep starts at
        self.absent: set[tuple[int, bytes]] = set()  # keys read since the last write that the store lacks
        self.count: dict[int, int] = {}  # partition -> keys in the store (RocksDB's estimate, then kept exact)
        self.evicted = 0  # keys deleted before their TTL because their partition was over its bound

    def get(self, partition: int, key: bytes) -> F.State | None:
        v = self.pending.get((partition, key), _MISSING)
        if v is _MISSING:
            raw = self.store._db_for_partition(partition).get(key)
            if raw is None:
                self.absent.add((partition, key))
                return None
            return orjson.loads(raw)
        return v  # type: ignore[return-value]

    def new_keys(self) -> dict[int, int]:
        """Per partition, the keys that the pending writes add to the store."""
        out: dict[int, int] = {}
        for pk in self.absent:
            if self.pending.get(pk) is not None:
                out[pk[0]] = out.get(pk[0], 0) + 1
        return out

    def keys(self, partition: int) -> int:
        """Keys of ``partition`` in the store (after the last write)."""
        n = self.count.get(partition)
        if n is None:
            db = self.store._db_for_partition(partition)
            n = self.count[partition] = int(db.property_int_value("rocksdb.estimate-num-keys") or 0)
        return n

    def memory(self) -> dict[str, int]:
        """``ROCKSDB_PROPERTIES`` summed over this worker's open partition stores of the table (each store has a
        block cache of its own, so the sum is what the process holds): what of the worker's RSS is RocksDB's,
        bounded by the settings' memtable and cache sizes per store."""
        out = dict.fromkeys(ROCKSDB_PROPERTIES, 0)
        for db in list(self.store._dbs.values()):
            for name, prop in ROCKSDB_PROPERTIES.items():
                out[name] += int(db.property_int_value(prop) or 0)
        return out

    def put(self, partition: int, key: bytes, state: F.State | None) -> None:
        self.pending[(partition, key)] = state

    def discard(self) -> None:
        """Forget every put since the last write (a failed batch: its events are taken again)."""
        self.pending = {}
        self.absent = set()

    def sweep(self, partition: int, now_ms: int, visit: int, evict_before_ms: int | None = None) -> None:
        """Delete the keys of ``partition`` idle at event time ``now_ms``, visiting at most ``visit`` keys from
        where the previous sweep of the partition stopped (and starting over at the end). ``evict_before_ms``
        (a partition over its key bound): also delete visited keys whose newest event is older than that."""
        if visit <= 0:
            return
        it = self.store._db_for_partition(partition).iter()
        start = self.cursor.pop(partition, None)
        it.seek(start) if start is not None else it.seek_to_first()
        wrapped = start is None
        for _ in range(visit):
            if not it.valid():  # the end of the partition: go on from its start, once
                if wrapped:
                    return
                wrapped = True
                it.seek_to_first()
                continue
            k = it.key()
            if wrapped and start is not None and k >= start:
                self.cursor[partition] = k  # a whole round: the next sweep goes on from here
                return
            if not k.startswith(b"__faust"):  # Faust's own bookkeeping (the persisted changelog offset)
                v = self.pending.get((partition, k), _MISSING)
                hi = _state_hi(it.value()) if v is _MISSING else (None if v is None else v["hi"])  # type: ignore[index]
                if hi is not None and F.is_expired(hi, now_ms):
                    self.put(partition, k, None)
                elif hi is not None and evict_before_ms is not None and hi < evict_before_ms:
                    self.put(partition, k, None)
                    self.evicted += 1
            it.next()
        if it.valid():
            self.cursor[partition] = it.key()

    def write(self, pub: Publisher) -> None:
        pending, self.pending = self.pending, {}
        absent, self.absent = self.absent, set()
        batches: dict[int, Any] = {}
        for (p, k), st in pending.items():
            new = (p, k) in absent
            self.count[p] = self.keys(p) + (1 if st is not None and new else -1 if st is None and not new else 0)
            wb = batches.get(p)
            if wb is None:
                wb = batches[p] = rocksdict.WriteBatch(raw_mode=True)
            if st is None:
                wb.delete(k)
                pub.add(self.topic, k, None, partition=p)
            else:
                v = orjson.dumps(st)
                wb.put(k, v)
                pub.add(self.topic, k, v, partition=p)
        for p, wb in batches.items():
            self.store._db_for_partition(p).write(wb)

    def persisted(self, sent: list[tuple[str, int, int, Any]]) -> None:
        for topic, p, n, fut in sent:
            if topic == self.topic:
                fut.add_done_callback(partial(self._persisted, p, n))

    def _persisted(self, partition: int, n: int, fut: Any) -> None:
        if not fut.cancelled() and fut.exception() is None and fut.result() is not None:
            self.store.set_persisted_offset(TP(self.topic, partition), fut.result().offset + n - 1)


class Stats(SimpleNamespace):
    """Counters of one stage (logged, and read by tests through the log)."""

    copies: int = 0  # clicks seen again that the state holds already (their outputs are in Kafka: nothing sent)
    duplicate_ids: int = 0  # clicks whose id their user key had seen (a producer's resend): dead-lettered


DUPLICATE_ID = [-1.0]  # apply's answer for a click whose id its key has seen (a producer's resend)
RECENT_IDS = 16  # click ids remembered per user key to recognise a producer's resend


def apply(cl: TableWriter, partition: int, key: bytes, c: F.ClickLike, src: tuple[int, int], update: Any,
          stats: Stats, check_id: bool = False) -> list[float] | None:
    """One click through a per-key table stage, with at-least-once redelivery handled exactly (module doc).

    ``src``: the click's position in the clicks topic (its dedupe key, also downstream). Returns its features, or
    None for a click the state holds already (its outputs were acknowledged before the state was written).
    ``check_id`` (the user stage): a click whose id is among the key's last ``RECENT_IDS`` (``"ids"``) is a
    producer's resend: ``DUPLICATE_ID``, never counted, so it cannot change any click's features.
    """
    st = cl.get(partition, key)
    if st is not None:
        if F.is_duplicate(st, src):
            stats.copies += 1
            cl.put(partition, key, st)  # the local store may be ahead of the changelog after a crash: re-send
            return None
        if check_id and c.click_id in st.get("ids", ()):
            stats.duplicate_ids += 1
            return DUPLICATE_ID
    st, feats = update(st, c, src)
    if check_id:
        st["ids"] = [*st.get("ids", ())[-(RECENT_IDS - 1):], c.click_id]
    cl.put(partition, key, st)
    return feats
