"""bench/peer.py, the Quix Streams peer of ``slidr bench e2e``: over a small backlog on the real broker it decides
every click once, with the project's functions (its user features are the offline ones), dead-letters what the
worker would, and leaves no topic of its own behind."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bench import peer

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(peer.quix_missing() is not None, reason=f"the Quix Streams peer: {peer.quix_missing()}"),
]


def test_peer_decides_every_click_with_the_projects_features(kenv: Any) -> None:
    from bench.e2e import consume_count
    from schemas.events import DeadLetter, decode_decision
    from stream import features as F
    from stream import toymodel
    from stream.stages import read_feature_log
    from stream.synth import traffic
    from tests.stream import kafka_helpers as K

    s, t, n = kenv.settings, kenv.topics, 2_000
    clicks = traffic(n, seed=11)
    toymodel.build_registry(s.registry_path, version="toy-peer")
    junk = [b"not json", b'{"v": 1}']
    asyncio.run(K.produce(s, t.clicks, clicks, junk=junk))

    res = peer.measure(s, t.clicks, n + len(junk), timeout_s=300, state_dir=str(kenv.workdir))
    assert res["decided"] == n and res["dead_letters"] == len(junk)
    assert res["events_per_s"] > 0 and res["cpu_us_per_event"] > 0

    pt = peer.PeerTopics(s.topic_prefix)
    msgs = asyncio.run(consume_count(s, pt.decisions, n, 60))
    assert len(msgs) == n  # one decision per click, none twice
    assert {m.key for m in msgs} == {c.click_id.encode() for c in clicks}
    assert {decode_decision(m.value).model_version for m in msgs} == {"toy-peer"}

    logs = asyncio.run(K.read_until(s, [pt.feature_log], lambda r: len(r[pt.feature_log]) >= n, 60))
    rows = [row for m in logs[pt.feature_log] for row in read_feature_log(m.value)]
    assert len(rows) == n
    # per user key the peer sees the clicks topic's order, as the offline driver does: the same user features
    offline = F.featurize(clicks, {})
    at = {c.click_id: i for i, c in enumerate(clicks)}
    for row in rows:
        assert row["features"][:F.N_USER] == pytest.approx(offline[at[row["click_id"]]][:F.N_USER].tolist(), rel=1e-6)

    dead = asyncio.run(K.read_until(s, [pt.dead_letters], lambda r: len(r[pt.dead_letters]) >= len(junk), 30))
    letters = [DeadLetter.model_validate_json(m.value) for m in dead[pt.dead_letters]]
    assert sorted(dl.source_topic for dl in letters) == [t.clicks] * len(junk)
    assert {dl.field for dl in letters} == {"", "click_id"}  # not JSON; the first field missing

    async def left() -> list[str]:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(**s.kafka_client_kwargs())
        await admin.start()
        try:
            return [name for name in await admin.list_topics() if pt.internal(name)]
        finally:
            await admin.close()

    assert asyncio.run(left()) == []  # Quix's changelog and repartition topics (outside the prefix) are gone
