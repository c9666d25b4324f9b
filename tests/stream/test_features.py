"""Feature functions: hand-computed expectations and properties."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from typing import Any

import numpy as np
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import Click
from stream import features as F
from tests.stream.helpers import T0, click, traffic

MIN = F.MINUTE_MS


def _run_user(clicks: list[Click]) -> tuple[F.State, list[list[float]]]:
    st_: F.State | None = None
    out = []
    for c in clicks:
        st_, f = F.update_user(st_, c)
        out.append(f)
    assert st_ is not None
    return st_, out


def test_spec_and_hash_are_stable() -> None:
    assert len(F.FEATURE_NAMES) == F.N_FEATURES == len(set(F.FEATURE_NAMES))
    assert F.N_USER + F.N_IP + F.N_COMBO + 4 + 4 + len(F.CATEGORIES) + 1 + 4 == F.N_FEATURES
    assert len(F.FEATURE_SPEC_HASH) == 64
    assert F.FEATURE_SPEC["names"] == list(F.FEATURE_NAMES)


def test_user_windows_hand_computed() -> None:
    # clicks at t0, t0+30 s, t0+2 min, t0+10 min, t0+2 h (times aligned to a minute boundary)
    t0 = (T0 // MIN) * MIN
    ts = [t0, t0 + 30_000, t0 + 2 * MIN, t0 + 10 * MIN, t0 + 120 * MIN]
    _, out = _run_user([click(i, t) for i, t in enumerate(ts)])
    counts = [f[:4] for f in out]
    assert counts == [[1, 1, 1, 1], [2, 2, 2, 2], [1, 3, 3, 3], [1, 1, 4, 4], [1, 1, 1, 5]]
    gaps = [f[4] for f in out]
    assert gaps == [F.GAP_CAP_S, 30.0, 90.0, 480.0, 6600.0]
    # EWMA of log1p(gap): first value log1p(cap), var 0; then the textbook recursion
    m, v = math.log1p(F.GAP_CAP_S), 0.0
    assert out[0][5] == m and out[0][6] == 0.0
    for g, f in zip(gaps[1:], out[1:], strict=True):
        d = math.log1p(g) - m
        m += F.GAP_EWMA_ALPHA * d
        v = (1 - F.GAP_EWMA_ALPHA) * (v + F.GAP_EWMA_ALPHA * d * d)
        assert f[5] == m and f[6] == math.sqrt(v)


def test_combo_counters_hand_computed() -> None:
    """User agent x ad counters within a shard of IPs: clicks 1 h / 24 h, burst ratio, new-user and new-IP shares,
    gap; a redelivered click changes nothing."""
    t0 = (T0 // F.HOUR_MS) * F.HOUR_MS
    a, b, c_ = (dict(customer=u, ua="UA/1", ad="ad7") for u in ("kA", "kB", "kC"))
    steps = [  # (click, ip, new user, new ip)
        (click(0, t0, ip="10.0.0.1", **a), True, True),
        (click(1, t0 + 30_000, ip="10.0.0.2", **b), True, True),
        (click(2, t0 + 2 * MIN, ip="10.0.0.1", **a), False, False),
        (click(3, t0 + 120 * MIN, ip="10.0.0.1", **c_), True, False),
    ]
    st_: F.State | None = None
    out = []
    for j, (c, nu, ni) in enumerate(steps):
        st_, f = F.update_combo(st_, c, (0, j), new_user=nu, new_ip=ni)
        out.append(f)
    burst = [math.log1p(c1) - math.log1p(c24 / 24) for c1, c24 in ((1, 1), (2, 2), (3, 3), (1, 4))]
    assert out == [
        [1, 1, burst[0], 1.0, 1.0, F.GAP_CAP_S],
        [2, 2, burst[1], 1.0, 1.0, 30.0],
        [3, 3, burst[2], 2 / 3, 2 / 3, 90.0],
        [1, 4, burst[3], 1.0, 0.0, 7080.0],  # the hour before holds only this click (user kC, IP .1: not new)
    ]
    assert st_ is not None
    again, f = F.update_combo(orjson.loads(orjson.dumps(st_)), steps[3][0], (0, 3), new_user=True, new_ip=True)
    assert again == st_ and f == out[3]  # a copy: counted once, the same features
    # the flags come from the click's own user and IP counts over 24 h
    uf, ipf = [0.0] * F.N_USER, [0.0] * F.N_IP
    uf[F.FEATURE_NAMES.index("u_clicks_24h")], ipf[F.FEATURE_NAMES.index("ip_clicks_24h") - F.N_USER] = 1.0, 2.0
    assert F.is_new(uf, ipf) == (True, False)


def _in_a_process_with(shards: int, code: str) -> Any:
    """What ``code`` (Python printing one JSON value) prints in a fresh process with SLIDR_COMBO_SHARDS=shards."""
    env = {**os.environ, "SLIDR_COMBO_SHARDS": str(shards)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True, timeout=120)
    return orjson.loads(out.stdout.splitlines()[-1])


def test_the_shard_count_is_a_setting_that_the_spec_hash_covers() -> None:
    """SLIDR_COMBO_SHARDS sets the shard count where the features are defined, once per process: 12 shards give
    another feature spec hash (a model trained with 4 is refused) and keys with 12 shards, which every divisor of
    12 keeps in one by-ip partition; the default gives this process's spec exactly."""
    from stream.stages import ip_partition

    ips = [f"10.{i % 7}.{i % 3}.{i}" for i in range(200)] + ["2001:db8::/64", "192.0.2.77"]
    code = ("import orjson; from stream import features as F; print(orjson.dumps([F.COMBO_SHARDS, "
            f"F.FEATURE_SPEC_HASH, F.FEATURE_SPEC['combo_shards'], [F.combo_shard(ip) for ip in {ips!r}]]).decode())")
    n, spec, in_spec, shards = _in_a_process_with(12, code)
    assert (n, in_spec) == (12, 12) and spec != F.FEATURE_SPEC_HASH
    assert shards == [F.combo_shard(ip, 12) for ip in ips] and set(shards) == set(range(12))
    for p in (1, 2, 3, 4, 6, 12):
        assert all(ip_partition(ip, p) == sh % p for ip, sh in zip(ips, shards, strict=True))
    assert _in_a_process_with(F.COMBO_SHARDS, code)[1] == F.FEATURE_SPEC_HASH


def test_combo_shards_each_have_one_by_ip_partition() -> None:
    """A combination's key names its shard of IPs; with a partition count dividing COMBO_SHARDS every shard's
    clicks reach one by-ip partition (the IP stage's, ``stages.ip_partition``), so one owner counts them."""
    from stream.stages import ip_partition

    ips = [f"10.{i % 7}.{i % 3}.{i}" for i in range(200)] + ["2001:db8::/64", "192.0.2.77"]
    for p in (d for d in range(1, F.COMBO_SHARDS + 1) if F.COMBO_SHARDS % d == 0):
        for ip in ips:
            assert ip_partition(ip, p) == F.combo_shard(ip) % p
    assert {F.combo_shard(ip) for ip in ips} == set(range(F.COMBO_SHARDS))
    k = F.combo_key(click(0, T0, ip="10.0.0.1", ua="Mozilla/5.0 (X11)", ad="ad9"))
    assert k == f"{F.combo_shard('10.0.0.1')}|{F.ua_key('Mozilla/5.0 (X11)')}|ad9"


def test_24h_window_and_expiry() -> None:
    t0 = (T0 // F.HOUR_MS) * F.HOUR_MS
    ts = [t0, t0 + 23 * F.HOUR_MS, t0 + 24 * F.HOUR_MS]
    st_, out = _run_user([click(i, t) for i, t in enumerate(ts)])
    assert [f[3] for f in out] == [1, 2, 2]  # the first click's hour left the 24 hour buckets
    assert len(st_["h"]) == 2 and len(st_["m"]) == 1
    # more than the TTL later: a fresh state (first-click gap again)
    st2, f = F.update_user(st_, click(9, ts[-1] + F.TTL_MS + 1))
    assert f[:5] == [1, 1, 1, 1, F.GAP_CAP_S]
    assert not F.is_expired(st2["hi"], ts[-1] + F.TTL_MS + 1)
    assert not F.is_expired(st2["hi"], ts[-1] + 1 + 2 * F.TTL_MS + F.EXPIRY_GRACE_MS)
    assert F.is_expired(st2["hi"], ts[-1] + 2 + 2 * F.TTL_MS + F.EXPIRY_GRACE_MS)


def test_late_click_lands_in_its_own_bucket() -> None:
    t0 = (T0 // MIN) * MIN
    st_, _ = _run_user([click(0, t0), click(1, t0 + 10 * MIN)])
    st_, f = F.update_user(st_, click(2, t0 + 30_000))  # 9.5 minutes late
    assert f[:4] == [2, 2, 2, 3]  # minute windows end at its own minute; the 24 h one at its own hour
    assert f[4] == 0.0  # a late click's gap is 0
    assert st_["m"] == [[t0 // MIN, 2], [t0 // MIN + 10, 1]]
    assert st_["hi"] == t0 + 10 * MIN


def test_redelivery_is_idempotent() -> None:
    cs = traffic(300, seed=3)
    users: dict = {}
    ips: dict = {}
    last: list[float] = []
    for i, c in enumerate(cs):
        src = (i % 3, i)  # upstream (partition, offset)
        users[c.user_key], _ = F.update_user(users.get(c.user_key), c, src)
        ips[c.ip], last = F.update_ip(ips.get(c.ip), c, src)
    snap_u, snap_i = json.dumps(users, sort_keys=True), json.dumps(ips, sort_keys=True)
    for i in range(200, 300):  # the tail of the stream redelivered after a crash
        c = cs[i]
        assert F.is_duplicate(users[c.user_key], (i % 3, i))
        users[c.user_key], _ = F.update_user(users[c.user_key], c, (i % 3, i))
        ips[c.ip], f = F.update_ip(ips[c.ip], c, (i % 3, i))
    assert f == last  # the last click's features read back unchanged
    assert json.dumps(users, sort_keys=True) == snap_u
    assert json.dumps(ips, sort_keys=True) == snap_i
    assert not F.is_duplicate(users[cs[0].user_key], (0, 300)) and not F.is_duplicate(None, (0, 1))


def test_ip_distinct_users_and_sessions() -> None:
    t0 = T0
    cs = [
        click(0, t0, session="a", customer="u1"),
        click(1, t0 + 1000, session="b"),
        click(2, t0 + 2000, session="a", customer="u1"),
        click(3, t0 + 2 * F.HOUR_MS, session="c", customer="u2"),
    ]
    st_, out = None, []
    for c in cs:
        st_, f = F.update_ip(st_, c)
        out.append(f)
    # [clicks 1h, clicks 24h, users 1h, users 24h, sessions 1h, sessions 24h]
    assert [f[:6] for f in out] == [[1, 1, 1, 1, 1, 1], [2, 2, 2, 2, 2, 2], [3, 3, 2, 2, 2, 2], [1, 4, 1, 3, 1, 3]]


def test_entity_features_hand_computed() -> None:
    """Per user key and per IP: distinct ads over 1 h and 24 h, seconds since the key's previous click on the same
    ad; per IP: distinct user agents (24 h)."""
    cap = F.GAP_CAP_S
    cs = [
        click(0, T0, ad="a1", ua="UA/1", ip="10.0.0.1", customer="u1"),
        click(1, T0 + 10_000, ad="a2", ua="UA/1", ip="10.0.0.2", customer="u1"),
        click(2, T0 + 25_000, ad="a1", ua="UA/2", ip="10.0.0.1", customer="u1"),
        click(3, T0 + 2 * F.HOUR_MS, ad="a1", ua="UA/1", ip="10.0.0.1", customer="u1"),
    ]
    su = si = None
    users, ips = [], []
    for c in cs:
        su, uf = F.update_user(su, c)
        users.append(uf[7:])
        if c.ip == "10.0.0.1":
            si, ipf = F.update_ip(si, c)
            ips.append(ipf[6:])
    # [ads 1h, ads 24h, s since same ad]
    assert users == [[1, 1, cap], [2, 2, cap], [2, 2, 25.0], [1, 2, 7175.0]]
    # [ads 1h, ads 24h, s since same ad on this IP, user agents 24h]
    assert ips == [[1, 1, cap, 1], [1, 1, 25.0, 2], [1, 1, 7175.0, 2]]
    assert F.ua_key("UA/1") == F.ua_key("UA/1") != F.ua_key("UA/2")


def test_a_state_from_feature_version_1_gets_its_entity_sets() -> None:
    su, _ = F.update_user(None, click(0, T0))
    si, _ = F.update_ip(None, click(0, T0))
    for st_, keys in ((su, ("a", "ag")), (si, ("a", "ag", "ua"))):
        for k in keys:
            del st_[k]
    su, uf = F.update_user(su, click(1, T0 + 1000))
    si, ipf = F.update_ip(si, click(1, T0 + 1000))
    assert uf[:2] == [2, 2] and uf[7:] == [1, 1, F.GAP_CAP_S]
    assert ipf[:2] == [2, 2] and ipf[6:] == [1, 1, F.GAP_CAP_S, 1]


def test_ip_distinct_set_is_capped() -> None:
    st_ = None
    for i in range(F.DISTINCT_CAP + 50):
        st_, f = F.update_ip(st_, click(i, T0 + i, session=f"s{i}"))
    assert st_ is not None
    assert len(st_["u"]) == len(st_["s"]) == F.DISTINCT_CAP
    assert f[2] == f[3] == F.DISTINCT_CAP
    assert "s:s0" not in st_["u"] and f"s:s{F.DISTINCT_CAP + 49}" in st_["u"]


def test_assemble_time_platform_profile() -> None:
    # 2024-01-01 (epoch day 19723) was a Monday; 06:00 UTC is a quarter of the day
    ts = 19723 * F.DAY_MS + 6 * F.HOUR_MS
    c = click(0, ts, platform="mobile", customer="k1")
    v = F.assemble(c, [0.0] * F.N_USER, [0.0] * F.N_IP, [0.0] * F.N_COMBO, (0.7, 1.0, 12.0, 0.0))
    d = dict(zip(F.FEATURE_NAMES, v, strict=True))
    assert math.isclose(d["hour_sin"], 1.0) and abs(d["hour_cos"]) < 1e-12
    assert d["dow_sin"] == 0.0 and d["dow_cos"] == 1.0
    assert (d["logged_in"], d["platform_desktop"], d["platform_mobile"], d["platform_app"]) == (1, 0, 1, 0)
    assert (d["rfm_score"], d["rfm_known"], d["account_age_days"], d["ip_datacenter"]) == (0.7, 1, 12, 0)
    # local time: UTC-06:00 makes it midnight local
    v2 = F.assemble(click(0, ts, tz=-360), [0.0] * 7, [0.0] * 6, [], (-1.0, 0.0, -1.0, 0.0))
    assert abs(v2[13]) < 1e-12 and math.isclose(v2[14], 1.0)


def test_hashed_categories_are_bucket_ids_of_normalised_values() -> None:
    """User agent family (lowercased, dotted versions cut to the major) and placement as bucket ids in [1, n);
    0 for an empty value. Minor versions share a family's bucket; another major version or family may not."""
    chrome = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0"
    assert F.ua_family(chrome).endswith("chrome/131") and "windows nt 10;" in F.ua_family(chrome)
    n_ua, n_pl = dict(F.CATEGORIES)["ua_family"], dict(F.CATEGORIES)["placement"]

    def cats(**kw: str) -> tuple[float, float]:
        d = dict(zip(F.FEATURE_NAMES, F.assemble(click(0, T0, **kw), [0.0] * F.N_USER, [0.0] * F.N_IP,
                                                   [0.0] * F.N_COMBO, F.MISSING_PROFILE), strict=True))
        return d["ua_family"], d["placement"]

    assert cats() == (0.0, 0.0)
    ua, pl = cats(ua=chrome, placement="search_top")
    assert 1 <= ua < n_ua and 1 <= pl < n_pl and ua == int(ua) and pl == int(pl)
    assert cats(ua=chrome.replace("131.0.0.0", "131.0.6778.86"), placement=" Search_Top") == (ua, pl)
    assert cats(ua="curl/8.5.0")[0] == cats(ua="curl/8.11.1")[0] != cats(ua="python-requests/2.32.3")[0]


def test_price_is_log1p_of_the_click_s_cpc() -> None:
    """cpc_log = log(1 + cpc), read from the click alone: no state, the same for an ad never seen before."""
    def price(cpc: float) -> float:
        d = dict(zip(F.FEATURE_NAMES, F.assemble(click(0, T0).model_copy(update={"cpc": cpc}), [0.0] * F.N_USER,
                                                   [0.0] * F.N_IP, [0.0] * F.N_COMBO, F.MISSING_PROFILE), strict=True))
        return d["cpc_log"]

    assert price(0.0) == 0.0
    assert math.isclose(price(2.5), math.log(3.5)) and price(11.0) > price(2.5) > price(0.35) > 0.0
    assert ("price", ("cpc_log",)) in F.FEATURE_GROUPS


def test_profiles_build_and_lookup() -> None:
    prof = F.build_profiles(
        [{"customer_id": "k1", "rfm_score": 0.25, "account_age_days": 400, "recency_days": 3}],
        [{"prefix": "10.0.0.0/24", "datacenter": True}, {"prefix": "10.0.1.0/24", "datacenter": False}],
    )
    assert F.lookup_profile(click(0, T0, customer="k1", ip="10.0.0.9"), prof.get) == (0.25, 1.0, 400.0, 1.0)
    assert F.lookup_profile(click(0, T0, ip="10.0.1.9"), prof.get) == (-1.0, 0.0, -1.0, 0.0)
    assert F.lookup_profile(click(0, T0, customer="nobody", ip="::1"), prof.get) == (-1.0, 0.0, -1.0, 0.0)
    assert F.ip_range_key("2001:db8:1:2::5") == "ipr:2001:db8:1::/48"


def test_featurize_matches_step_by_step_and_json_roundtrip() -> None:
    cs = traffic(2000, seed=1)
    X = F.featurize(cs, {})
    assert X.shape == (2000, F.N_FEATURES) and X.dtype == np.float32
    # online the state goes through JSON (Faust table values) between every click: same numbers
    users: dict[str, bytes] = {}
    ips: dict[str, bytes] = {}
    combos: dict[str, bytes] = {}
    rows = []
    empty: dict[str, bytes] = {}
    for c in cs:
        k = F.combo_key(c)
        su = orjson.loads(users[c.user_key]) if c.user_key in users else None
        si = orjson.loads(ips[c.ip]) if c.ip in ips else None
        sx = orjson.loads(combos[k]) if k in combos else None
        su, uf = F.update_user(su, c)
        si, ipf = F.update_ip(si, c)
        sx, xf = F.update_combo(sx, c, None, *F.is_new(uf, ipf))
        users[c.user_key], ips[c.ip], combos[k] = orjson.dumps(su), orjson.dumps(si), orjson.dumps(sx)
        rows.append(F.assemble(c, uf, ipf, xf, F.lookup_profile(c, empty.get)))
    assert np.array_equal(np.asarray(rows, dtype=np.float32), X)


ts_lists = st.lists(st.integers(0, 3 * F.HOUR_MS), min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(ts_lists, st.randoms(use_true_random=False))
def test_final_bucket_counts_are_order_insensitive(offsets: list[int], rnd: random.Random) -> None:
    cs = [click(i, T0 + o) for i, o in enumerate(offsets)]
    a, _ = _run_user(cs)
    shuffled = cs[:]
    rnd.shuffle(shuffled)
    b, _ = _run_user(shuffled)
    assert a["hi"] == b["hi"]
    # buckets still inside the windows at the end hold the same counts whatever the order
    hi_m, hi_h = a["hi"] // MIN, a["hi"] // F.HOUR_MS
    assert [x for x in a["m"] if x[0] > hi_m - 60] == [x for x in b["m"] if x[0] > hi_m - 60]
    assert [x for x in a["h"] if x[0] > hi_h - 24] == [x for x in b["h"] if x[0] > hi_h - 24]
    ia, ib = None, None
    for c in cs:
        ia, _ = F.update_ip(ia, c)
    for c in shuffled:
        ib, _ = F.update_ip(ib, c)
    assert ia is not None and ib is not None
    assert sorted(ia["u"].items()) == sorted(ib["u"].items())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2 * F.DAY_MS), st.integers(0, 400)), min_size=1, max_size=400))
def test_state_stays_bounded(events: list[tuple[int, int]]) -> None:
    su = si = None
    for i, (o, s) in enumerate(sorted(events)):
        c = click(i, T0 + o, session=f"s{s}")
        su, uf = F.update_user(su, c)
        si, ipf = F.update_ip(si, c)
        assert all(x >= 0 for x in uf[:4] + ipf)
        assert uf[0] <= uf[1] <= uf[2] <= uf[3]
    assert su is not None and si is not None
    assert len(su["m"]) <= 61 and len(su["h"]) <= 25 and su["src"] == {}
    assert len(si["u"]) <= F.DISTINCT_CAP and len(si["s"]) <= F.DISTINCT_CAP
    assert len(orjson.dumps(su)) < 2048


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(1, 5)), max_size=80), st.integers(0, 220),
       st.sampled_from([(1,), (24,), (1, 5, 60), (2, 3), (60,)]))
def test_window_counts_equal_the_definition(raw: list[tuple[int, int]], b: int, widths: tuple[int, ...]) -> None:
    counts: dict[int, int] = {}
    for x, c in raw:
        counts[x] = counts.get(x, 0) + c
    buckets = [[x, counts[x]] for x in sorted(counts)]
    want = [sum(c for x, c in buckets if b - w < x <= b) for w in widths]
    assert F._window_counts(buckets, b, widths) == want


def test_textual_variants_of_one_address_are_one_ip() -> None:
    """(issue 16, item 7) Three spellings of 2001:db8::1, and an IPv4 address with its IPv4-mapped form, count as
    one IP each; a client rotating inside its IPv6 /64 stays one IP; the datacenter flag of a compressed IPv6
    address is found (its range key used to be ``ipr:2001:db8:::/48``, which matched nothing)."""
    v6 = ["2001:db8::1", "2001:DB8:0:0::1", "2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::ffff:1"]
    v4 = ["203.0.113.45", "::ffff:203.0.113.45"]
    cs = [click(i, T0 + i * 1000, ip=ip, session=f"s{i}") for i, ip in enumerate(v6 + v4)]
    assert {c.ip_key for c in cs[:4]} == {"2001:db8::/64"} and {c.ip_key for c in cs[4:]} == {"203.0.113.45"}
    prof = F.build_profiles([], [{"prefix": "2001:DB8:0::/48", "datacenter": True},
                                 {"prefix": "203.0.113.7/24", "datacenter": True}])
    X = F.featurize(cs, prof)
    col = F.FEATURE_NAMES.index
    assert X[:4, col("ip_clicks_1h")].tolist() == [1, 2, 3, 4]
    assert X[4:, col("ip_clicks_1h")].tolist() == [1, 2]
    assert X[:4, col("ip_users_1h")].tolist() == [1, 2, 3, 4]
    assert X[:, col("ip_datacenter")].tolist() == [1.0] * 6
    assert F.ip_range_key("2001:db8::1") == F.ip_range_key("2001:DB8:0:0::1") == "ipr:2001:db8::/48"
    assert F.ip_range_key("::ffff:10.1.2.3") == F.ip_range_key("10.1.2.99") == "ipr:10.1.2.0/24"
