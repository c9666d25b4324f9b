"""Records handed to Kafka a batch per topic-partition, not one by one (the worker's hot path, issue 4).

aiokafka's ``send()`` costs a coroutine, a future and a partitioner call per record (about 7 us, plus the
asyncio ``get_event_loop`` behind every future); at several records per click that was a large share of the
worker. A ``Publisher`` gathers records into one aiokafka ``BatchBuilder`` per topic-partition and ``flush``
submits each with ``send_batch``: one future per batch. The builders are closed before submission, so they are
sent at once instead of lingering. Keyed records go to the partition Kafka's default partitioner picks
(murmur2 of the key, as the Java client and aiokafka do), so consumers see the same partitioning as ``send()``.

Batches go into the same producer as everything else, so ``producer.flush()`` (which Faust runs before every
offset commit) waits for them too. A batch that fails for good (aiokafka retried what it could: record too
large, not authorised, delivery timeout) calls ``on_failure`` with the reason from the future's callback, which
runs before Faust's flush returns and so before any commit: the worker stops there (``stages.fail_stop``), so
no offset is ever committed past records that never reached Kafka.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from aiokafka.partitioner import murmur2


def key_partition(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner: murmur2 of the key, positive, modulo the partition count."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class Publisher:
    """Collects records per topic-partition; ``flush`` hands them to ``producer`` (an AIOKafkaProducer)."""

    def __init__(self, producer: Callable[[], Any], partitions: Callable[[str], int],
                 on_failure: Callable[[str], None] | None = None) -> None:
        self._producer = producer  # called at flush time: the producer may start after we are built
        self._partitions = partitions  # topic -> partition count
        self._on_failure = on_failure
        self._open: dict[tuple[str, int], Any] = {}
        self._full: list[tuple[tuple[str, int], Any]] = []

    def discard(self) -> None:
        """Drop every record added since the last flush (a failed batch: its events are taken again)."""
        self._open, self._full = {}, []

    def add(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None,
            headers: list[tuple[str, bytes]] | None = None) -> None:
        """Add one record (``value`` None: a tombstone); ``partition`` None: the key's default partition."""
        if partition is None:
            if key is None:
                raise ValueError("a record without a key needs an explicit partition")
            partition = key_partition(key, self._partitions(topic))
        tp = (topic, partition)
        b = self._open.get(tp)
        if b is None:
            b = self._open[tp] = self._producer().create_batch()
        hs = headers or []
        if b.append(key=key, value=value, timestamp=None, headers=hs) is None:  # full: start another batch
            self._full.append((tp, b))
            b = self._open[tp] = self._producer().create_batch()
            if b.append(key=key, value=value, timestamp=None, headers=hs) is None:
                raise ValueError(f"a record of {len(value or b'')} bytes does not fit in one producer batch")

    async def flush(self) -> list[tuple[str, int, int, Any]]:
        """Submit every batch; return (topic, partition, record count, future of the batch's base offset)."""
        batches = self._full + list(self._open.items())
        self._full, self._open = [], {}
        prod = self._producer()
        out = []
        for (topic, p), b in batches:
            n = b.record_count()
            b.close()  # ready to send now (a closed batch does not linger)
            fut = await prod.send_batch(b, topic, partition=p)
            if self._on_failure is not None:
                fut.add_done_callback(partial(self._check, topic, p, n))
            out.append((topic, p, n, fut))
        return out

    def _check(self, topic: str, partition: int, n: int, fut: Any) -> None:
        if self._on_failure is not None and not fut.cancelled() and fut.exception() is not None:
            self._on_failure(f"a batch of {n} records to {topic}[{partition}] failed for good: {fut.exception()!r}")
