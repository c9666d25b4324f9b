from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import (
    SLICES,
    Click,
    DeadLetter,
    Decision,
    Purchase,
    SchemaError,
    decode_click,
    decode_decision,
    decode_purchase,
)
from schemas.events import MAX_PAYLOAD_BYTES, decode

NOW = 1_762_000_000_000  # 2025-11-01T12:26:40Z


def click(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = dict(
        click_id="c-1", ts=NOW, ip="203.0.113.7", session_id="sess-1", platform="mobile",
        ad_id="ad-1", campaign_id="cmp-1", advertiser_id="adv-1", placement="top", cpc=0.42,
        user_agent="Mozilla/5.0",
    )
    base.update(over)
    return base


def raw(d: dict[str, Any]) -> bytes:
    return orjson.dumps(d)


def test_valid_click_round_trips() -> None:
    c = decode_click(raw(click(customer_id="cust-9", logged_in=True, tz_offset_min=-300)))
    assert c.user_key == "c:cust-9"
    assert c.slice == "mobile:in"
    assert decode_click(c.to_json()) == c


def test_anonymous_user_key_is_the_session() -> None:
    assert decode_click(raw(click())).user_key == "s:sess-1"


def test_slices_cover_platform_by_login() -> None:
    assert len(SLICES) == 6 and "app:out" in SLICES and "desktop:in" in SLICES


@pytest.mark.parametrize(
    ("payload", "field", "fragment"),
    [
        (b"", "", "empty"),
        (b"{not json", "", "not valid JSON"),
        (b"\xff\xfe\x00", "", "not valid JSON"),
        (b"[1, 2]", "", "not a JSON object"),
        (b"null", "", "not a JSON object"),
        (raw(click(ts="1762000000000")), "ts", "integer"),
        (raw(click(ts=1.5e12)), "ts", "integer"),
        (raw(click(ts=12)), "ts", "greater than or equal"),
        (raw(click(cpc="0.4")), "cpc", "number"),
        (raw(click(cpc=-1)), "cpc", "greater than or equal"),
        (raw(click(logged_in="yes")), "logged_in", "boolean"),
        (raw(click(ip="999.1.1.1")), "ip", "not an IPv4/IPv6 address"),
        (raw(click(platform="tv")), "platform", "'desktop', 'mobile' or 'app'"),
        (raw(click(logged_in=True)), "logged_in", "exactly when customer_id"),
        (raw(click(customer_id="x")), "logged_in", "exactly when customer_id"),
        (raw(click(click_id="")), "click_id", "at least 1"),
        (raw(click(click_id="has space")), "click_id", "pattern"),
        (raw(click(user_agent="u" * 513)), "user_agent", "at most 512"),
        (raw(click(extra=1)), "extra", "Extra inputs"),
        (raw({k: v for k, v in click().items() if k != "ad_id"}), "ad_id", "required"),
        (raw(click(v=2)), "v", "1"),
    ],
)
def test_each_defect_names_its_field(payload: bytes, field: str, fragment: str) -> None:
    with pytest.raises(SchemaError) as ei:
        decode_click(payload)
    assert ei.value.field == field
    assert fragment in ei.value.reason
    assert str(ei.value).startswith(field or "payload")


def test_oversized_payload_is_refused_before_parsing() -> None:
    big = raw(click(placement="p")).replace(b'"p"', b'"' + b"p" * MAX_PAYLOAD_BYTES + b'"')
    with pytest.raises(SchemaError, match="exceeds the 4096-byte limit"):
        decode_click(big)


def test_timestamps_far_from_now_are_refused_when_now_is_given() -> None:
    future = raw(click(ts=NOW + 3_600_000))
    assert decode_click(future).ts == NOW + 3_600_000  # no clock given: only absolute bounds apply
    with pytest.raises(SchemaError, match="in the future") as ei:
        decode_click(future, now_ms=NOW)
    assert ei.value.field == "ts"
    old = raw(click(ts=NOW - 40 * 86_400_000))
    with pytest.raises(SchemaError, match="days old"):
        decode_click(old, now_ms=NOW, max_age_ms=30 * 86_400_000)
    assert decode_click(old, now_ms=NOW).ts == NOW - 40 * 86_400_000


def test_non_bytes_input_is_a_schema_error() -> None:
    with pytest.raises(SchemaError, match="expected bytes"):
        decode(Click, 42)


def test_purchase_decision_and_dead_letter_round_trip() -> None:
    p = Purchase(purchase_id="p-1", click_id="c-1", ts=NOW, amount=12.5)
    assert decode_purchase(p.to_json()) == p
    d = Decision(click_id="c-1", valid=False, score=0.93, threshold=0.7, slice="app:out", model_version="m1",
                 revision=2, replay_id="r-1", decided_at=NOW, reason="score>=threshold", event_ts=NOW,
                 advertiser_id="adv-1", cpc=0.42)
    assert decode_decision(d.to_json()) == d
    dl = DeadLetter(source_topic="t", partition=0, offset=5, field="ts", error="bad",
                    raw_b64=base64.b64encode(b"\x00").decode(), received_at=NOW)
    assert decode(DeadLetter, dl.to_json()) == dl
    with pytest.raises(SchemaError) as ei:
        decode_decision(orjson.dumps({**orjson.loads(d.to_json()), "score": 1.5}))
    assert ei.value.field == "score"


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_decoder_on_arbitrary_bytes_raises_only_schema_error(data: bytes) -> None:
    with contextlib.suppress(SchemaError):
        decode_click(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.sampled_from([*sorted(click()), "customer_id", "logged_in", "x"]), json_values))
def test_decoder_on_arbitrary_json_objects_raises_only_schema_error(obj: dict[str, Any]) -> None:
    for candidate in (obj, {**click(), **obj}):
        try:
            c = decode_click(json.dumps(candidate).encode())  # stdlib: allows huge ints
        except SchemaError as e:
            assert isinstance(e.field, str) and e.reason
        else:
            assert decode_click(c.to_json()) == c
