"""Wire schemas: raw click, purchase, billing decision and dead-letter records.

Every record is a JSON object encoded with orjson and carries ``v`` (the schema version). Decoding is
strict: JSON types must match exactly (no "12" for 12), unknown fields are refused, strings and payloads
have size limits, timestamps are epoch milliseconds inside sane bounds. Any problem raises
:class:`SchemaError` naming the field and the reason; nothing else escapes the decoders.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Annotated, Any, Final, Literal, Protocol, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

SCHEMA_VERSION: Final = 1
MAX_PAYLOAD_BYTES = 4096
MIN_TS_MS = 946_684_800_000  # 2000-01-01T00:00:00Z: anything earlier is a unit or clock error
MAX_TS_MS = 4_102_444_800_000  # 2100-01-01T00:00:00Z
DEFAULT_MAX_FUTURE_MS = 5 * 60 * 1000  # clocks may run ahead a little, not more

PLATFORMS = ("desktop", "mobile", "app")
Platform = Literal["desktop", "mobile", "app"]

Id = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:@/+=-]+$")]
SessionId = Annotated[str, StringConstraints(min_length=1, max_length=128)]
ShortText = Annotated[str, StringConstraints(max_length=64)]
UserAgent = Annotated[str, StringConstraints(max_length=512)]
TimestampMs = Annotated[int, Field(ge=MIN_TS_MS, le=MAX_TS_MS)]
Money = Annotated[float, Field(ge=0.0, le=1_000_000.0, allow_inf_nan=False)]


class SchemaError(ValueError):
    """A record that does not follow its schema. ``field`` names the offending field ('' for the payload)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field or 'payload'}: {reason}")
        self.field = field
        self.reason = reason


def slice_of(platform: str, logged_in: bool) -> str:
    """The traffic slice a click belongs to, e.g. ``mobile:in`` or ``app:out``."""
    return f"{platform}:{'in' if logged_in else 'out'}"


SLICES = tuple(slice_of(p, li) for p in PLATFORMS for li in (True, False))


class _Record(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump())


@functools.lru_cache(maxsize=1 << 16)
def _is_ip(s: str) -> bool:
    """``ipaddress`` parsing, remembered: the same IPs recur (gateways, bots) and parsing was a quarter of a
    click's decoding time."""
    try:
        ipaddress.ip_address(s)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=1 << 16)
def ip_key(s: str) -> str:
    """The key an IP is counted under: the canonical form of an IPv4 address (an IPv4-mapped IPv6 address is its
    IPv4 one), and for IPv6 its /64 network, canonical (``2001:db8::/64``): a client gets a whole /64 and rotates
    freely inside it. ``2001:DB8:0:0::1`` and ``2001:db8::1`` are one key. Remembered, like ``_is_ip``."""
    a = ipaddress.ip_address(s)
    if isinstance(a, ipaddress.IPv6Address):
        if a.ipv4_mapped is not None:
            return str(a.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(a) >> 64 << 64, 64)))
    return str(a)


class _KeyFields(Protocol):
    @property
    def customer_id(self) -> str | None: ...
    @property
    def session_id(self) -> str: ...
    @property
    def platform(self) -> str: ...
    @property
    def logged_in(self) -> bool: ...
    @property
    def ip(self) -> str: ...


class ClickKeys:
    """What a click is counted under: shared by ``Click`` and the worker's light view of a validated click.
    (No annotations here: pydantic would take them for fields and reorder ``Click``'s wire JSON.)"""

    @property
    def user_key(self: _KeyFields) -> str:
        """The entity whose click rate we count: the customer when logged in, else the session/visitor."""
        return f"c:{self.customer_id}" if self.customer_id is not None else f"s:{self.session_id}"

    @property
    def slice(self: _KeyFields) -> str:
        return slice_of(self.platform, self.logged_in)

    @property
    def ip_key(self: _KeyFields) -> str:
        """The IP entity whose clicks we count (``ip_key``: canonical, IPv6 by /64)."""
        return ip_key(self.ip)


class Click(_Record, ClickKeys):
    """A raw ad click as producers send it to the clicks topic."""

    v: Literal[1] = SCHEMA_VERSION
    click_id: Id
    ts: TimestampMs  # event time, epoch milliseconds UTC
    ip: Annotated[str, StringConstraints(min_length=2, max_length=45)]
    session_id: SessionId  # the visitor key for anonymous traffic
    customer_id: Id | None = None  # present exactly when logged in
    logged_in: bool = False
    user_agent: UserAgent = ""
    platform: Platform
    ad_id: Id
    campaign_id: Id
    advertiser_id: Id
    placement: ShortText = ""
    cpc: Money = 0.0  # price of the click to the advertiser
    tz_offset_min: Annotated[int, Field(ge=-840, le=840)] | None = None  # visitor's local offset if known

    @model_validator(mode="after")
    def _check(self) -> Click:
        if not _is_ip(self.ip):
            raise ValueError(f"ip: not an IPv4/IPv6 address: {self.ip[:45]!r}")
        if self.logged_in != (self.customer_id is not None):
            raise ValueError("logged_in: must be true exactly when customer_id is set")
        return self


class Purchase(_Record):
    """A purchase (attribution) event: the click it is attributed to led to a conversion."""

    v: Literal[1] = SCHEMA_VERSION
    purchase_id: Id
    click_id: Id
    ts: TimestampMs
    customer_id: Id | None = None
    amount: Money = 0.0


class Decision(_Record):
    """What billing reads: is this click billable? Latest ``revision`` per ``click_id`` wins."""

    v: Literal[1] = SCHEMA_VERSION
    click_id: Id
    valid: bool  # True = billable (human), False = invalidated (robotic)
    score: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]  # P(robot)
    threshold: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
    slice: Annotated[str, StringConstraints(max_length=32)]
    model_version: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    revision: Annotated[int, Field(ge=0)] = 0  # 0 = live; replays publish higher revisions
    replay_id: Id | None = None
    decided_at: TimestampMs
    reason: Annotated[str, StringConstraints(max_length=256)] = ""
    event_ts: TimestampMs  # the click's event time
    advertiser_id: Id
    cpc: Money = 0.0
    # scored while the profile cache was unreachable (profile features missing): replay re-decides these
    degraded: bool = False


class DeadLetter(_Record):
    """A message that could not be accepted, kept whole with where it came from and why."""

    v: Literal[1] = SCHEMA_VERSION
    source_topic: str
    partition: int
    offset: int
    field: str
    error: str
    raw_b64: str  # the exact bytes received, base64
    received_at: int


R = TypeVar("R", bound=_Record)


def _first_error(e: ValidationError) -> SchemaError:
    err = e.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    msg = str(err.get("msg", "invalid"))
    if err.get("type") == "value_error":  # our own model validators put "field: reason" in the message
        msg = msg.removeprefix("Value error, ")
        field, sep, reason = msg.partition(": ")
        if sep:
            return SchemaError(field, reason)
    inp = err.get("input")
    if err.get("type") == "json_invalid":
        return SchemaError("", f"not valid JSON ({err.get('ctx', {}).get('error', msg)})")
    if err.get("type") == "model_type" or (not loc and isinstance(inp, (list, str, int, float, bool))):
        return SchemaError("", "not a JSON object")
    return SchemaError(loc, msg)


def decode(model: type[R], raw: Any, *, now_ms: int | None = None,
           max_future_ms: int = DEFAULT_MAX_FUTURE_MS, max_age_ms: int | None = None) -> R:
    """Decode and validate one JSON record; raise :class:`SchemaError` and nothing else.

    With ``now_ms`` given, a timestamp more than ``max_future_ms`` ahead of it, or (when ``max_age_ms`` is
    set) older than ``max_age_ms``, is refused as well.
    """
    if not isinstance(raw, (bytes, bytearray, memoryview, str)):
        raise SchemaError("", f"expected bytes, got {type(raw).__name__}")
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > MAX_PAYLOAD_BYTES:
        raise SchemaError("", f"payload of {size} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit")
    if size == 0:
        raise SchemaError("", "empty payload")
    try:
        rec = model.model_validate_json(bytes(raw) if isinstance(raw, memoryview) else raw)
    except ValidationError as e:
        raise _first_error(e) from None
    except (ValueError, TypeError, RecursionError) as e:  # defensive: validate_json should not raise these
        raise SchemaError("", f"undecodable: {e}") from None
    if now_ms is not None:
        ts = getattr(rec, "ts", None)
        if ts is not None:
            if ts > now_ms + max_future_ms:
                raise SchemaError("ts", f"{ts} is {(ts - now_ms) / 1000:.0f} s in the future")
            if max_age_ms is not None and ts < now_ms - max_age_ms:
                raise SchemaError("ts", f"{ts} is {(now_ms - ts) / 86_400_000:.1f} days old")
    return rec


def decode_click(raw: Any, **kw: Any) -> Click:
    return decode(Click, raw, **kw)


def decode_purchase(raw: Any, **kw: Any) -> Purchase:
    return decode(Purchase, raw, **kw)


def decode_decision(raw: Any, **kw: Any) -> Decision:
    return decode(Decision, raw, **kw)
