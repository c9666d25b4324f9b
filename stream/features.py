"""Pure feature functions shared by the stream (Faust tables) and offline training (plain dicts).

Per-entity state is a small JSON-serialisable dict (a Faust table value online, a dict value offline). The
update functions take ownership of the state they are given (they may mutate it) and return the new state with
the entity's features for this click. Everything is event time: a replay in the same arrival order recomputes
the same values bit for bit.

Windows: minute buckets for the last hour and hour buckets for the last day, each a sorted list of
``[bucket_index, count]`` pairs holding only non-empty buckets. A window of W minutes at a click with event
time t counts the buckets ``t_bucket - W < b <= t_bucket`` as known when the click arrives (a late click
lands in its own, older bucket and sees the clicks known around its own time). The 24 h window is 24 hour
buckets (the current hour + the 23 before it).

Idempotence (at-least-once redelivery): the update functions take an optional ``src = (partition, offset)``,
the click's position in the upstream topic. Per key and upstream partition positions arrive in increasing
order, so a state remembers the highest offset applied per upstream partition (at most one entry per
partition) and ``is_duplicate`` recognises a redelivered copy exactly; ``user_features`` / ``ip_features``
read a key's features without changing it.
Expiry: a state whose newest event is more than ``TTL_MS`` older than the click is dropped (a fresh one
starts). ``is_expired`` (idle for longer than ``TTL_MS + EXPIRY_GRACE_MS`` of event time) is the rule for
deleting idle keys: the worker sweeps its tables with it, a slice of each partition per flush, against the
newest event time seen in that partition (``stream.app.TableWriter.sweep``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
import zlib
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from operator import itemgetter
from typing import Any, Protocol

import numpy as np
import orjson

from slidr.settings import FeatureSettings

# --- the spec ---------------------------------------------------------------------------------------------
FEATURE_VERSION = 6
MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
USER_WINDOWS_MIN = (1, 5, 60)  # minute-bucket windows per user key (plus 24 h from hour buckets)
IP_WINDOWS_MIN = (60,)  # minute-bucket windows per IP (plus 24 h)
TTL_MS = DAY_MS  # state older than this (event time) is dropped
EXPIRY_GRACE_MS = HOUR_MS  # online key deletion waits this much longer (late clicks within it stay exact)
GAP_CAP_S = 86_400.0  # seconds since the previous click, capped; also the value for a key's first click
GAP_EWMA_ALPHA = 0.2  # EWMA weight of the newest log gap
COMBO_BUCKET_MS = 5 * MINUTE_MS  # the combinations' 1 h window in 5-minute buckets (12 objects a state, not 60)
# user agent x ad counters are kept per shard of IPs (crc32(ip_key) % COMBO_SHARDS): see update_combo. A setting
# (SLIDR_COMBO_SHARDS, default 4), read once here; the spec below holds it, so the spec hash covers it
COMBO_SHARDS = FeatureSettings().combo_shards
DISTINCT_CAP = 256  # most recent distinct keys remembered per set (users, sessions, ads, ...; exact below the cap)
PLATFORMS = ("desktop", "mobile", "app")
# hashed categories (issue 18, item 3): a click's user agent family and placement as bucket ids, which the learned
# models embed (``models.nets.Embeddings``) and every other consumer of the vector ignores. Bucket 0 = empty;
# others crc32 % (n - 1) + 1. A value never seen in training lands in a bucket whose embedding stayed at its zero
# start (or is shared with a seen value: hashing, not a vocabulary, so no state and nothing to update online).
CATEGORIES: tuple[tuple[str, int], ...] = (("ua_family", 1024), ("placement", 64))

FEATURE_NAMES: tuple[str, ...] = (
    # per user key
    "u_clicks_1m", "u_clicks_5m", "u_clicks_1h", "u_clicks_24h",
    "u_gap_s", "u_lgap_mean", "u_lgap_std",
    "u_ads_1h", "u_ads_24h", "u_ad_gap_s",
    # per IP
    "ip_clicks_1h", "ip_clicks_24h", "ip_users_1h", "ip_users_24h", "ip_sessions_1h", "ip_sessions_24h",
    "ip_ads_1h", "ip_ads_24h", "ip_ad_gap_s", "ip_uas_24h",
    # per user agent x ad, within the click's shard of IPs (update_combo)
    "ua_ad_clicks_1h", "ua_ad_clicks_24h", "ua_ad_burst", "ua_ad_new_users", "ua_ad_new_ips", "ua_ad_gap_s",
    # time of day / week on the unit circle (local time when tz_offset_min is known, else UTC)
    "hour_sin", "hour_cos", "dow_sin", "dow_cos",
    # click
    "logged_in", "platform_desktop", "platform_mobile", "platform_app",
    # hashed categories (CATEGORIES): bucket ids, not quantities
    "ua_family", "placement",
    # the click's price to the advertiser, log(1 + cpc): fraud goes where clicks pay (a value of the click, not an
    # ad id, so it holds on ads never seen in training)
    "cpc_log",
    # profile (Redis): -1 when unknown (anonymous or not in the cache); all -1 / 0 when the cache is unreachable
    # (MISSING_PROFILE: ip_datacenter -1 marks it, a value a reachable cache never gives)
    "rfm_score", "rfm_known", "account_age_days", "ip_datacenter",
)  # fmt: skip
N_FEATURES = len(FEATURE_NAMES)
# Feature groups: an invalid decision's reason codes name them (``stream.scoring.reason_groups``; all but
# ``slice``, the context a click is judged in) and ``slidr report --groups`` drops each in turn. A group is
# occluded or dropped as a whole, so correlated features (a key's 1 h and 24 h counts) are judged together.
FEATURE_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("user_velocity", ("u_clicks_1m", "u_clicks_5m", "u_clicks_1h", "u_clicks_24h")),
    ("user_timing", ("u_gap_s", "u_lgap_mean", "u_lgap_std")),
    ("user_ads", ("u_ads_1h", "u_ads_24h", "u_ad_gap_s")),
    ("ip_volume", ("ip_clicks_1h", "ip_clicks_24h")),
    ("ip_users", ("ip_users_1h", "ip_users_24h")),
    ("ip_sessions", ("ip_sessions_1h", "ip_sessions_24h")),
    ("ip_ads", ("ip_ads_1h", "ip_ads_24h", "ip_ad_gap_s")),
    ("ip_agents", ("ip_uas_24h",)),
    ("ua_ad_volume", ("ua_ad_clicks_1h", "ua_ad_clicks_24h", "ua_ad_burst", "ua_ad_gap_s")),
    ("ua_ad_newcomers", ("ua_ad_new_users", "ua_ad_new_ips")),
    ("time_of_day", ("hour_sin", "hour_cos", "dow_sin", "dow_cos")),
    ("slice", ("logged_in", "platform_desktop", "platform_mobile", "platform_app")),
    ("ua_family", ("ua_family",)),
    ("placement", ("placement",)),
    ("price", ("cpc_log",)),
    ("customer_profile", ("rfm_score", "rfm_known", "account_age_days")),
    ("ip_datacenter", ("ip_datacenter",)),
)  # fmt: skip
N_USER = 10
N_IP = 10
N_COMBO = 6

FEATURE_SPEC: dict[str, Any] = {
    "version": FEATURE_VERSION,
    "names": list(FEATURE_NAMES),
    "user_windows_min": [*USER_WINDOWS_MIN, 1440],
    "ip_windows_min": [*IP_WINDOWS_MIN, 1440],
    "ttl_ms": TTL_MS,
    "gap_cap_s": GAP_CAP_S,
    "gap_ewma_alpha": GAP_EWMA_ALPHA,
    "distinct_cap": DISTINCT_CAP,
    "entities": "per user key and per IP: distinct ads (1 h, 24 h) and seconds since the same key's previous click "
                "on the same ad; per IP: distinct user agents (24 h, by crc32); per (user agent crc32, ad) within a "
                "shard of IPs (crc32(ip_key) % combo_shards): clicks 1 h / 24 h and their burst ratio, shares of "
                "its 1 h clicks from users and IPs on their first click in 24 h, seconds since its previous "
                "click",
    "combo_shards": COMBO_SHARDS,
    "combo_bucket_ms": COMBO_BUCKET_MS,
    "platforms": list(PLATFORMS),
    "categories": {"buckets": dict(CATEGORIES), "hash": "crc32(utf-8) % (n - 1) + 1, 0 for an empty value",
                   "ua_family": "lowercased, each dotted version cut to its first number (Chrome/131.0.0.0 -> "
                                "chrome/131)"},
    "price": "cpc_log = log1p(max(cpc, 0))",
    "time": "local if tz_offset_min else UTC; hour = fractional hour of day, dow Monday=0",
    "missing_profile": [-1.0, 0.0, -1.0, -1.0],
    "ip_key": "canonical IPv4 (IPv4-mapped IPv6 as IPv4), IPv6 by its /64; ranges /24 and /48",
}


class ClickLike(Protocol):
    """What the feature functions read from a click (``schemas.Click`` has all of it)."""

    @property
    def click_id(self) -> str: ...
    @property
    def ts(self) -> int: ...
    @property
    def ip(self) -> str: ...
    @property
    def session_id(self) -> str: ...
    @property
    def customer_id(self) -> str | None: ...
    @property
    def logged_in(self) -> bool: ...
    @property
    def platform(self) -> str: ...
    @property
    def tz_offset_min(self) -> int | None: ...
    @property
    def ad_id(self) -> str: ...
    @property
    def user_agent(self) -> str: ...
    @property
    def placement(self) -> str: ...
    @property
    def cpc(self) -> float: ...
    @property
    def user_key(self) -> str: ...
    @property
    def ip_key(self) -> str: ...


State = dict[str, Any]
_first = itemgetter(0)


# --- bucket helpers ---------------------------------------------------------------------------------------
def _bump(buckets: list[list[int]], b: int) -> None:
    """Add one to bucket ``b`` of a sorted sparse bucket list."""
    if not buckets or buckets[-1][0] < b:
        buckets.append([b, 1])
    elif buckets[-1][0] == b:
        buckets[-1][1] += 1
    else:  # late click: its own (older) bucket
        i = bisect_left(buckets, b, key=_first)
        if buckets[i][0] == b:
            buckets[i][1] += 1
        else:
            buckets.insert(i, [b, 1])


def _window_counts(buckets: list[list[int]], b: int, widths: tuple[int, ...]) -> list[int]:
    """Clicks in buckets ``b - w < x <= b`` for each width (widths ascending): one pass from the newest bucket,
    a running total read off as each width is passed."""
    out = []
    total = 0
    k = 0
    n = len(widths)
    for x, c in reversed(buckets):
        if x > b:
            continue
        age = b - x
        while age >= widths[k]:
            out.append(total)
            k += 1
            if k == n:
                return out
        total += c
    return out + [total] * (n - k)


def _prune(buckets: list[list[int]], keep_after: int) -> None:
    """Drop buckets with index <= keep_after (they left every window)."""
    k = 0
    n = len(buckets)
    while k < n and buckets[k][0] <= keep_after:
        k += 1
    if k:
        del buckets[:k]


Src = tuple[int, int] | None  # (upstream partition, upstream offset) of the click, when known


def is_duplicate(state: State | None, src: Src) -> bool:
    """Whether the click at upstream position ``src`` was applied to this state already."""
    return state is not None and src is not None and state["src"].get(str(src[0]), -1) >= src[1]


def _mark(state: State, src: Src) -> None:
    if src is not None:
        state["src"][str(src[0])] = src[1]


def _fresh(state: State | None, ts: int) -> bool:
    return state is None or ts - state["hi"] > TTL_MS


def is_expired(hi_ms: int, now_ms: int) -> bool:
    """Whether the stream may delete a key whose newest event time (its state's ``"hi"``) is ``hi_ms``: idle for
    longer than TTL + grace of event time."""
    return now_ms - int(hi_ms) > TTL_MS + EXPIRY_GRACE_MS


# --- per user key -----------------------------------------------------------------------------------------
def update_user(state: State | None, click: ClickLike, src: Src = None) -> tuple[State, list[float]]:
    """Apply one click to a user key's state; return (state, user features in FEATURE_NAMES order).
    A duplicate (``is_duplicate(state, src)``) changes nothing and gets the current features."""
    ts = click.ts
    if state is None or _fresh(state, ts):
        state = {"hi": ts, "m": [], "h": [], "g": GAP_CAP_S, "lm": math.log1p(GAP_CAP_S), "lv": 0.0,
                 "a": {}, "ag": GAP_CAP_S, "src": {}, "new": True}
    elif "a" not in state:  # a state written before feature version 2: its entity set starts now
        state.update(a={}, ag=GAP_CAP_S)
    if not is_duplicate(state, src):
        _mark(state, src)
        state["ag"] = _see(state["a"], click.ad_id, ts)
        if state.pop("new", False):
            gap = GAP_CAP_S  # first click of this key: no previous click within the TTL
        else:
            gap = min(max(ts - state["hi"], 0) / 1000.0, GAP_CAP_S)  # late click: gap 0
            lg = math.log1p(gap)
            d = lg - state["lm"]
            state["lm"] += GAP_EWMA_ALPHA * d
            state["lv"] = (1.0 - GAP_EWMA_ALPHA) * (state["lv"] + GAP_EWMA_ALPHA * d * d)
        state["g"] = gap
        _bump(state["m"], ts // MINUTE_MS)
        _bump(state["h"], ts // HOUR_MS)
        if ts > state["hi"]:
            state["hi"] = ts
    feats = user_features(state, click)
    _prune(state["m"], state["hi"] // MINUTE_MS - 60)  # after counting: a very late click still counts itself
    _prune(state["h"], state["hi"] // HOUR_MS - 24)
    return state, feats


def user_features(state: State, click: ClickLike) -> list[float]:
    """A user key's features at this click, read from its state (which must already hold the click)."""
    m = click.ts // MINUTE_MS
    h = click.ts // HOUR_MS
    c1, c5, c60 = _window_counts(state["m"], m, USER_WINDOWS_MIN)
    (c24,) = _window_counts(state["h"], h, (24,))
    a1, a24 = _distinct(state["a"], click.ts)
    return [float(c1), float(c5), float(c60), float(c24),
            float(state["g"]), float(state["lm"]), math.sqrt(state["lv"]),
            float(a1), float(a24), float(state["ag"])]


# --- per IP -----------------------------------------------------------------------------------------------
def _touch(seen: dict[str, int], key: str, ts: int) -> None:
    """Record ``key`` last seen at ``ts`` in an insertion-ordered capped dict (oldest update evicted)."""
    old = seen.pop(key, None)
    seen[key] = ts if old is None or ts > old else old
    if len(seen) > DISTINCT_CAP:
        del seen[next(iter(seen))]


def _see(seen: dict[str, int], key: str, ts: int) -> float:
    """``_touch``, returning the seconds since ``key`` was last seen (capped at GAP_CAP_S; GAP_CAP_S when never or
    longer ago than the TTL; 0 for a late click)."""
    old = seen.get(key)
    _touch(seen, key, ts)
    if old is None or ts - old > TTL_MS:
        return GAP_CAP_S
    return min(max(ts - old, 0) / 1000.0, GAP_CAP_S)


@lru_cache(maxsize=1 << 12)
def ua_key(user_agent: str) -> str:
    """A user agent's key in a state: its crc32 (a state stays small whatever the header's length)."""
    return format(zlib.crc32(user_agent.encode("utf-8", "surrogatepass")), "x")


def _distinct(seen: dict[str, int], ts: int) -> tuple[int, int]:
    """Distinct keys last seen after ts - 1 h and after ts - 24 h."""
    lo1 = ts - HOUR_MS
    lo24 = ts - DAY_MS
    n1 = n24 = 0
    for t in seen.values():
        if t > lo24:
            n24 += 1
            if t > lo1:
                n1 += 1
    return n1, n24


def update_ip(state: State | None, click: ClickLike, src: Src = None) -> tuple[State, list[float]]:
    """Apply one click to an IP's state; return (state, IP features in FEATURE_NAMES order).
    A duplicate (``is_duplicate(state, src)``) changes nothing and gets the current features."""
    ts = click.ts
    if state is None or _fresh(state, ts):
        state = {"hi": ts, "m": [], "h": [], "u": {}, "s": {}, "a": {}, "ag": GAP_CAP_S, "ua": {}, "src": {}}
    elif "a" not in state:  # a state written before feature version 2
        state.update(a={}, ag=GAP_CAP_S, ua={})
    if not is_duplicate(state, src):
        _mark(state, src)
        state["ag"] = _see(state["a"], click.ad_id, ts)
        _touch(state["ua"], ua_key(click.user_agent), ts)
        _bump(state["m"], ts // MINUTE_MS)
        _bump(state["h"], ts // HOUR_MS)
        _touch(state["u"], click.user_key, ts)
        _touch(state["s"], click.session_id, ts)
        if ts > state["hi"]:
            state["hi"] = ts
    feats = ip_features(state, click)
    _prune(state["m"], state["hi"] // MINUTE_MS - 60)
    _prune(state["h"], state["hi"] // HOUR_MS - 24)
    return state, feats


def ip_features(state: State, click: ClickLike) -> list[float]:
    """An IP's features at this click, read from its state (which must already hold the click)."""
    ts = click.ts
    m = ts // MINUTE_MS
    h = ts // HOUR_MS
    (c60,) = _window_counts(state["m"], m, IP_WINDOWS_MIN)
    (c24,) = _window_counts(state["h"], h, (24,))
    u1, u24 = _distinct(state["u"], ts)
    s1, s24 = _distinct(state["s"], ts)
    a1, a24 = _distinct(state["a"], ts)
    _, ua24 = _distinct(state["ua"], ts)
    return [float(c60), float(c24), float(u1), float(u24), float(s1), float(s24),
            float(a1), float(a24), float(state["ag"]), float(ua24)]


# --- per user agent x ad, within a shard of IPs -----------------------------------------------------------
def combo_shard(ip_key: str, shards: int = COMBO_SHARDS) -> int:
    """The click's shard of IPs: crc32 of its IP key modulo ``shards`` (this process's ``COMBO_SHARDS``; another
    count only to compute what a process set up with it computes). The IP stage's partitions are
    crc32(ip_key) % partitions (``stream.stages.ip_partition``), so with a partition count dividing
    ``COMBO_SHARDS`` every shard is kept by exactly one by-ip partition, in event-time order."""
    return zlib.crc32(ip_key.encode()) % shards


def combo_key(click: ClickLike, shards: int = COMBO_SHARDS) -> str:
    """The key of a click's (shard of IPs, user agent, ad) counters (``shards``: as ``combo_shard``)."""
    return f"{combo_shard(click.ip_key, shards)}|{ua_key(click.user_agent)}|{click.ad_id}"


_U_CLICKS_24H = FEATURE_NAMES.index("u_clicks_24h")  # in the user features
_IP_CLICKS_24H = FEATURE_NAMES.index("ip_clicks_24h") - N_USER  # in the IP features


def is_new(user_feats: list[float], ip_feats: list[float]) -> tuple[bool, bool]:
    """Whether a click is its user key's and its IP's first in 24 h (``update_combo``'s new_user, new_ip)."""
    return user_feats[_U_CLICKS_24H] == 1.0, ip_feats[_IP_CLICKS_24H] == 1.0


def update_combo(state: State | None, click: ClickLike, src: Src = None, new_user: bool = False,
                 new_ip: bool = False) -> tuple[State, list[float]]:
    """Apply one click to its (shard of IPs, user agent, ad) state (``combo_key``); return (state, features in
    FEATURE_NAMES order). ``new_user`` / ``new_ip``: the click is its user key's / IP's first in 24 h (their own
    24 h counts are 1). A duplicate (``is_duplicate(state, src)``) changes nothing and gets the current features.

    Why a shard of IPs, not the whole combination: a click reaches one by-ip partition, and the combination's
    clicks from every IP would need a table keyed by it behind one more repartition hop. Within a shard the IP
    stage counts them exactly, at the cost of seeing 1 / ``COMBO_SHARDS`` of the IPs (a sample of them)."""
    ts = click.ts
    if state is None or _fresh(state, ts):
        state = {"hi": ts, "m": [], "h": [], "g": GAP_CAP_S, "src": {}, "new": True}
    if not is_duplicate(state, src):
        _mark(state, src)
        if state.pop("new", False):
            state["g"] = GAP_CAP_S
        else:
            state["g"] = min(max(ts - state["hi"], 0) / 1000.0, GAP_CAP_S)
        _bump_counts(state["m"], ts // COMBO_BUCKET_MS, 1 if new_user else 0, 1 if new_ip else 0)
        _bump(state["h"], ts // HOUR_MS)
        if ts > state["hi"]:
            state["hi"] = ts
    feats = combo_features(state, click)
    _prune(state["m"], state["hi"] // COMBO_BUCKET_MS - _COMBO_HOUR)
    _prune(state["h"], state["hi"] // HOUR_MS - 24)
    return state, feats


_COMBO_HOUR = HOUR_MS // COMBO_BUCKET_MS  # buckets in the 1 h window


def _bump_counts(buckets: list[list[int]], b: int, new_user: int, new_ip: int) -> None:
    """``_bump`` for buckets that also count new users and new IPs: ``[bucket, clicks, new users, new IPs]``."""
    if not buckets or buckets[-1][0] < b:
        buckets.append([b, 1, new_user, new_ip])
        return
    i = len(buckets) - 1 if buckets[-1][0] == b else bisect_left(buckets, b, key=_first)
    if buckets[i][0] != b:  # late click: its own (older) bucket
        buckets.insert(i, [b, 1, new_user, new_ip])
        return
    x = buckets[i]
    x[1] += 1
    x[2] += new_user
    x[3] += new_ip


def combo_features(state: State, click: ClickLike) -> list[float]:
    """A combination's features at this click, read from its state (which must already hold the click)."""
    ts = click.ts
    m = ts // COMBO_BUCKET_MS
    c60 = nu = ni = 0
    for x in reversed(state["m"]):  # the last hour: buckets m - 12 < x <= m
        if x[0] > m:
            continue
        if x[0] <= m - _COMBO_HOUR:
            break
        c60 += x[1]
        nu += x[2]
        ni += x[3]
    (c24,) = _window_counts(state["h"], ts // HOUR_MS, (24,))
    per = 1.0 / max(c60, 1)
    return [float(c60), float(c24), math.log1p(c60) - math.log1p(c24 / 24.0), nu * per, ni * per,
            float(state["g"])]


# --- profiles (the Redis cache's content) -----------------------------------------------------------------
def customer_key(customer_id: str) -> str:
    return f"cust:{customer_id}"


@lru_cache(maxsize=1 << 16)
def ip_range_key(ip: str) -> str:
    """Cache key of the IP's range, from an address or an ``ip_key`` in any textual form: its /24 for IPv4
    (``ipr:a.b.c.0/24``; an IPv4-mapped IPv6 address is IPv4), its /48 for IPv6 (canonical, ``ipr:2001:db8::/48``)."""
    a = ipaddress.ip_address(ip.partition("/")[0])
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    if isinstance(a, ipaddress.IPv4Address):
        return "ipr:" + str(ipaddress.IPv4Network((int(a) >> 8 << 8, 24)))
    return "ipr:" + str(ipaddress.IPv6Network((int(a) >> 80 << 80, 48)))


def range_key(prefix: str) -> str:
    """Cache key of a loaded IP range (``ip_ranges.jsonl``'s ``prefix``), canonical: ``2001:DB8:0::/48`` and
    ``2001:db8::/48`` are one key, host bits dropped."""
    return "ipr:" + str(ipaddress.ip_network(prefix, strict=False))


def build_profiles(customers: Iterable[Mapping[str, Any]],
                   ip_ranges: Iterable[Mapping[str, Any]]) -> dict[str, bytes]:
    """Cache content (key -> value bytes) from customers.jsonl / ip_ranges.jsonl records (cache load)."""
    out: dict[str, bytes] = {}
    for c in customers:
        out[customer_key(str(c["customer_id"]))] = orjson.dumps(
            [float(c["rfm_score"]), float(c.get("account_age_days", -1.0))])
    for r in ip_ranges:
        out[range_key(str(r["prefix"]))] = b"1" if r.get("datacenter") else b"0"
    return out


def profile_keys(click: ClickLike) -> tuple[str | None, str]:
    """The cache keys a click's profile needs (customer key or None, IP-range key)."""
    cid = click.customer_id
    return (customer_key(cid) if cid is not None else None), ip_range_key(click.ip_key)


def profile_from(cust: bytes | str | None, ipr: bytes | str | None) -> tuple[float, float, float, float]:
    """(rfm_score, rfm_known, account_age_days, ip_datacenter) from the two cached values (None = missing)."""
    if cust:
        rfm, age = orjson.loads(cust)
        prof = (float(rfm), 1.0, float(age))
    else:
        prof = (-1.0, 0.0, -1.0)
    dc = 1.0 if ipr in (b"1", "1") else 0.0
    return (*prof, dc)


Profile = tuple[float, float, float, float]
# The profile of a click scored while the cache is unreachable (the worker's degraded mode): nothing known, and
# ip_datacenter -1, which a reachable cache never gives (0 or 1), so the model can tell "cache down" from
# "anonymous" / "not a datacenter range". Training shows the model rows with it (``TrainConfig.profile_dropout``).
MISSING_PROFILE: Profile = (-1.0, 0.0, -1.0, -1.0)


def lookup_profile(click: ClickLike, get: Callable[[str], bytes | str | None]) -> Profile:
    ck, ik = profile_keys(click)
    return profile_from(get(ck) if ck is not None else None, get(ik))


# --- the vector -------------------------------------------------------------------------------------------
_TAU = 2.0 * math.pi
_PLAT = {p: tuple(1.0 if p == q else 0.0 for q in PLATFORMS) for p in PLATFORMS}
_DOTTED_VERSION = re.compile(r"(\d+)(?:\.\d+)+")
_BUCKETS = dict(CATEGORIES)


def ua_family(user_agent: str) -> str:
    """A user agent's family and major versions: lowercased, each dotted version cut to its first number."""
    return _DOTTED_VERSION.sub(r"\1", user_agent.strip().lower())


def bucket(value: str, n: int) -> float:
    """A category's bucket id among ``n`` (0: empty)."""
    return float(zlib.crc32(value.encode("utf-8", "surrogatepass")) % (n - 1) + 1) if value else 0.0


@lru_cache(maxsize=1 << 12)
def _ua_bucket(user_agent: str) -> float:
    return bucket(ua_family(user_agent), _BUCKETS["ua_family"])


@lru_cache(maxsize=1 << 10)
def _placement_bucket(placement: str) -> float:
    return bucket(placement.strip().lower(), _BUCKETS["placement"])


def assemble(click: ClickLike, user_feats: list[float], ip_feats: list[float], combo_feats: list[float],
             profile: tuple[float, float, float, float]) -> list[float]:
    """The full raw feature vector (FEATURE_NAMES order) of one click."""
    local_ms = click.ts + (click.tz_offset_min or 0) * MINUTE_MS
    day_frac = (local_ms % DAY_MS) / DAY_MS
    dow = ((local_ms // DAY_MS) + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    a = _TAU * day_frac
    b = _TAU * dow / 7.0
    return [*user_feats, *ip_feats, *combo_feats,
            math.sin(a), math.cos(a), math.sin(b), math.cos(b),
            1.0 if click.logged_in else 0.0, *_PLAT[click.platform],
            _ua_bucket(click.user_agent), _placement_bucket(click.placement),
            math.log1p(max(click.cpc, 0.0)),
            *profile]


def featurize(clicks: Iterable[ClickLike], profiles: Mapping[str, bytes | str]) -> np.ndarray:
    """Offline driver: features of every click in the given (arrival) order, float32 ``(N, F)``."""
    users: dict[str, State] = {}
    ips: dict[str, State] = {}
    combos: dict[str, State] = {}
    rows: list[list[float]] = []
    get = profiles.get
    for c in clicks:
        uk = c.user_key
        users[uk], uf = update_user(users.get(uk), c)
        ik = c.ip_key
        ips[ik], ipf = update_ip(ips.get(ik), c)
        ck = combo_key(c)
        combos[ck], xf = update_combo(combos.get(ck), c, None, *is_new(uf, ipf))
        rows.append(assemble(c, uf, ipf, xf, lookup_profile(c, get)))
    if not rows:
        return np.zeros((0, N_FEATURES), dtype=np.float32)
    return np.asarray(rows, dtype=np.float32)


# --- the spec hash ----------------------------------------------------------------------------------------
def _probe() -> tuple[list[Any], dict[str, bytes]]:
    """A fixed set of clicks (three users on two IPs, bursts and long gaps, a late click, a key idle past the TTL,
    time zones, platforms, logged in and out) and profiles, whose features enter the spec hash."""
    from types import SimpleNamespace

    t0 = 1_762_000_000_000
    steps = [0, 1, 2, 30, 61, 600, 3_700, 3_701, 90_000, 90_001, 90_002, 200_000]
    out = []
    for i in range(36):
        u = i % 3
        ts = t0 + steps[i % len(steps)] * 1000 + (i // len(steps)) * 7_000 - (5 * 60_000 if i == 20 else 0)
        cust = f"k{u}" if u != 2 else None
        ip = "10.1.2.3" if i % 2 else "192.0.2.77"
        out.append(SimpleNamespace(
            click_id=f"p{i}", ts=ts, ip=ip, ip_key=ip, session_id=f"s{u}", customer_id=cust,
            ad_id=f"ad{i % 4}", user_agent=f"UA/{(i // 3) % 3}.1.2", placement=("", "top", "side")[i % 3],
            logged_in=cust is not None, platform=PLATFORMS[i % 3], tz_offset_min=(60 * (i % 5) - 120) or None,
            cpc=(0.0, 0.35, 2.5, 11.0)[i % 4],
            user_key=f"c:{cust}" if cust else f"s:s{u}"))
    out.sort(key=lambda c: c.ts)
    profiles = build_profiles([{"customer_id": "k0", "rfm_score": 0.8, "account_age_days": 400}],
                              [{"prefix": "10.1.2.0/24", "datacenter": True}])
    return out, profiles


def compute_spec_hash() -> str:
    """sha256 of the spec's canonical JSON and of the features the code computes for a fixed set of clicks
    (rounded to 5 decimals, so a last-bit difference of a C library cannot move it): a change to a feature
    function moves the hash even when no constant in the spec changed, and a model trained on other features is
    refused (``stream.scoring.load_model``)."""
    clicks, profiles = _probe()
    h = hashlib.sha256(orjson.dumps(FEATURE_SPEC, option=orjson.OPT_SORT_KEYS))
    h.update(np.round(featurize(clicks, profiles).astype(np.float64), 5).tobytes())
    return h.hexdigest()


FEATURE_SPEC_HASH = compute_spec_hash()
