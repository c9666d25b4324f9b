"""The simulator: determinism, schema validity and the archetypes' statistical signatures (small scenario)."""

from __future__ import annotations

import filecmp
from collections import defaultdict
from pathlib import Path

import numpy as np
import orjson
import pytest

from models.data.dataset import load_dataset
from models.data.simulate import ARCHETYPES, DAY_MS, HOUR_MS, Simulation, load_scenario, simulate
from schemas.events import SLICES, Click, decode_click, decode_purchase

SEED = 7
FILES = ("clicks.jsonl", "purchases.jsonl", "customers.jsonl", "ip_ranges.jsonl", "truth.jsonl", "meta.json")


@pytest.fixture(scope="module")
def sim() -> Simulation:
    return simulate("small", SEED)


@pytest.fixture(scope="module")
def folder(sim: Simulation, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sim.write(tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="module")
def clicks(sim: Simulation) -> list[dict]:
    return [orjson.loads(x) for x in sim.click_lines()]


def _ukey(c: dict) -> str:
    return f"c:{c['customer_id']}" if c["customer_id"] else f"s:{c['session_id']}"


def _arch(sim: Simulation, name: str) -> np.ndarray:
    return sim.archetype == ARCHETYPES.index(name)


def test_same_seed_is_byte_identical(folder: Path, tmp_path: Path) -> None:
    again = simulate("small", SEED).write(tmp_path / "again")
    for f in FILES:
        assert filecmp.cmp(folder / f, again / f, shallow=False), f
    other = simulate("small", SEED + 1).write(tmp_path / "other")
    assert (folder / "clicks.jsonl").read_bytes() != (other / "clicks.jsonl").read_bytes()
    assert (folder / "truth.jsonl").read_bytes() != (other / "truth.jsonl").read_bytes()


def test_every_record_validates_strictly(sim: Simulation, folder: Path) -> None:
    lines = sim.click_lines()
    assert 25_000 <= len(lines) <= 40_000
    prev = 0
    for line in lines:
        c = decode_click(line)
        assert c.to_json() == line  # the file holds exactly the wire bytes
        assert c.ts >= prev
        prev = c.ts
    ids = {orjson.loads(x)["click_id"]: orjson.loads(x)["ts"] for x in lines}
    assert len(ids) == len(lines)
    prev = 0
    for line in sim.purchase_lines():
        p = decode_purchase(line)
        assert p.ts >= prev and p.click_id in ids and p.ts > ids[p.click_id]
        prev = p.ts
    ds = load_dataset(folder)
    assert len(ds) == len(lines) and ds.truth is not None and len(ds.truth) == len(lines)
    assert ds.is_bot is not None and (ds.is_bot == sim.is_bot).all()
    assert len(ds.purchased_click_ids) == len(ds.purchases) and ds.purchased.sum() == len(ds.purchases)
    assert {c.platform for c in ds.clicks} == {"desktop", "mobile", "app"}
    assert len({c.advertiser_id for c in ds.clicks}) >= 10 and len({c.ad_id for c in ds.clicks}) >= 100
    assert len(ds.ip_ranges) > 10 and all(r["datacenter"] for r in ds.ip_ranges)
    for cu in ds.customers.values():
        assert 0.0 <= cu["rfm_score"] <= 1.0


def test_truth_is_not_in_the_clicks(sim: Simulation) -> None:
    line = sim.click_lines()[0]
    assert b"is_bot" not in line and b"archetype" not in line
    assert set(orjson.loads(line)) == set(Click.model_fields)


def test_bot_share_per_slice_matches_the_scenario(sim: Simulation) -> None:
    sc = load_scenario("small")
    for i, s in enumerate(SLICES):
        m = sim.slice_index == i
        assert m.sum() > 1000
        assert abs(sim.is_bot[m].mean() - sc["slices"][s]["bot_share"]) < 0.01, s
    present = {ARCHETYPES[a] for a in np.unique(sim.archetype)}
    assert present == set(ARCHETYPES)


def test_gateways_carry_many_humans(sim: Simulation, clicks: list[dict]) -> None:
    users: dict[str, set[str]] = defaultdict(set)
    for c, bot in zip(clicks, sim.is_bot.tolist(), strict=True):
        if not bot:
            users[c["ip"]].add(_ukey(c))
    big = sorted((len(u) for u in users.values()), reverse=True)
    assert big[0] >= 100 and big[9] >= 30  # carrier NAT / office gateways
    assert np.median([len(u) for u in users.values()]) <= 2  # most homes: one or two users


def test_purchases_follow_human_clicks(sim: Simulation, clicks: list[dict]) -> None:
    idx = {c["click_id"]: i for i, c in enumerate(clicks)}
    bought = np.array([idx[orjson.loads(p)["click_id"]] for p in sim.purchase_lines()])
    bot_buys = int(sim.is_bot[bought].sum())
    assert bot_buys == sim.meta["bot_purchases"] <= 4  # accidents only (rate 0.0002 on ~3.6k bot clicks)
    share = (len(bought) - bot_buys) / int((~sim.is_bot).sum())
    assert 0.01 < share < 0.06  # a few % of human clicks
    delays = np.array([orjson.loads(p)["ts"] for p in sim.purchase_lines()]) - sim.ts[bought]
    assert delays.min() >= 60_000 and 5 * 60_000 < np.median(delays) < 3 * HOUR_MS


def test_high_rfm_customers_buy_more(folder: Path) -> None:
    ds = load_dataset(folder)
    rfm = np.array([ds.customers[c.customer_id]["rfm_score"] if c.customer_id else -1 for c in ds.clicks])
    human = ~ds.is_bot  # type: ignore[operator]
    hi, lo = human & (rfm >= 0.6), human & (rfm >= 0) & (rfm < 0.3)
    assert ds.purchased[hi].mean() > 1.5 * ds.purchased[lo].mean()
    scores = np.array([c["rfm_score"] for c in ds.customers.values()])
    assert np.median(scores) < 0.5 and (scores > 0.7).mean() > 0.02  # most modest, a share high


def _gaps_by_user(sim: Simulation, clicks: list[dict], mask: np.ndarray) -> np.ndarray:
    last: dict[str, int] = {}
    gaps = []
    for i in np.flatnonzero(mask).tolist():
        k = _ukey(clicks[i])
        if k in last:
            gaps.append(clicks[i]["ts"] - last[k])
        last[k] = clicks[i]["ts"]
    return np.array(gaps)


def test_bursty_bots_have_short_gaps(sim: Simulation, clicks: list[dict]) -> None:
    bursty = _gaps_by_user(sim, clicks, _arch(sim, "bursty"))
    human = _gaps_by_user(sim, clicks, _arch(sim, "human"))
    assert np.median(bursty) < 3_000
    assert np.median(human) > 20_000


def test_low_and_slow_bots_click_few_times_an_hour(sim: Simulation, clicks: list[dict]) -> None:
    per_hour: dict[tuple[str, int], int] = defaultdict(int)
    per_user: dict[str, int] = defaultdict(int)
    for i in np.flatnonzero(_arch(sim, "low_slow")).tolist():
        k = _ukey(clicks[i])
        per_hour[k, clicks[i]["ts"] // HOUR_MS] += 1
        per_user[k] += 1
    assert max(per_hour.values()) <= 5 and np.mean(list(per_hour.values())) < 2
    assert np.median(list(per_user.values())) >= 8  # persistent over the day


def test_many_clicks_alone_is_not_bot(sim: Simulation, clicks: list[dict]) -> None:
    n_by_user: dict[str, int] = defaultdict(int)
    for c in clicks:
        n_by_user[_ukey(c)] += 1
    n = np.array([n_by_user[_ukey(c)] for c in clicks])
    # a third of bot clicks come from keys with at most 5 clicks (botnets, rotation) ...
    assert (n[sim.is_bot] <= 5).mean() > 0.3
    # ... while busy humans reach counts as high as the typical bursty bot
    assert np.percentile(n[~sim.is_bot], 99.9) > np.median(n[_arch(sim, "bursty")]) / 3
    # residential botnets: most of their IPs carry at most 3 clicks
    ips: dict[str, int] = defaultdict(int)
    for i in np.flatnonzero(_arch(sim, "resi_botnet")).tolist():
        ips[clicks[i]["ip"]] += 1
    assert np.mean([v <= 3 for v in ips.values()]) > 0.9


def test_datacenter_flag_is_not_decisive(sim: Simulation, folder: Path, clicks: list[dict]) -> None:
    ds = load_dataset(folder)
    dc = np.array([c["ip"].rsplit(".", 1)[0] in ds.datacenter_prefixes for c in clicks])
    assert dc[_arch(sim, "dc_rotation")].all()
    assert (dc & ~sim.is_bot).sum() > 100  # corporate-VPN humans
    assert (~dc & sim.is_bot).sum() > (dc & sim.is_bot).sum()


def test_drift_archetype_appears_only_from_its_day(sim: Simulation) -> None:
    start = sim.meta["drift"]["start_ms"]
    assert start == sim.meta["start_ms"] + DAY_MS // 2
    farm = _arch(sim, "app_farm")
    assert farm.sum() > 50 and sim.ts[farm].min() >= start
    assert farm[sim.ts >= start].sum() == farm.sum()


def test_no_purchases_in_label_outage(sim: Simulation) -> None:
    (a, b), = sim.meta["label_outages"]
    assert b - a == 2 * HOUR_MS
    p_ts = np.array([orjson.loads(p)["ts"] for p in sim.purchase_lines()])
    assert not ((p_ts >= a) & (p_ts < b)).any()
    assert ((p_ts >= a - 2 * HOUR_MS) & (p_ts < a)).sum() > 10  # purchases right before it are kept


def test_rhythms_differ_by_slice(sim: Simulation, clicks: list[dict]) -> None:
    def peak(platform: str) -> int:
        hours = [(c["ts"] // 60_000 + (c["tz_offset_min"] or 0)) // 60 % 24 for c, b in
                 zip(clicks, sim.is_bot.tolist(), strict=True) if c["platform"] == platform and not b]
        return int(np.bincount(hours, minlength=24).argmax())

    assert 9 <= peak("desktop") <= 17 and 18 <= peak("app") <= 23
    night = _arch(sim, "night")
    local_h = [(c["ts"] // 60_000 + (c["tz_offset_min"] or 0)) // 60 % 24
               for c, m in zip(clicks, night.tolist(), strict=True) if m and c["tz_offset_min"] is not None]
    assert np.mean([h < 7 for h in local_h]) > 0.9


def test_overrides_and_scenario_files(tmp_path: Path) -> None:
    f = tmp_path / "tiny.json"
    f.write_bytes(orjson.dumps({"name": "tiny", "days": 0.25, "clicks": 3000}))
    s = simulate(f, 1, clicks=2000)
    assert s.meta["scenario"] == "tiny" and 1900 <= s.n_clicks <= 2000
    assert s.ts.max() < s.meta["start_ms"] + DAY_MS // 4
    with pytest.raises(ValueError):
        load_scenario("no-such-scenario")


# ---- realism (issue 17): no one-field giveaways, moving targets -------------------------------------------------
# flags the audit may raise on the small scenario, argued from real traffic: naive bots' scripted user agents
# (curl, python-requests ...); within a day, a botnet's or farm's devices work the same few ads, and a farm's
# few addresses carry all its devices (behaviour: an attacked campaign spikes, farm IPs get blocklisted)
ARGUED = {("bursty", "user_agent"), ("resi_botnet", "ad"), ("dc_rotation", "ad"), ("app_farm", "ad"),
          ("app_farm", "ip_24")}


def test_no_single_field_gives_an_archetype_away(folder: Path) -> None:
    from models.data.audit import FLAG_AUC, audit_folder

    audit = audit_folder(folder)
    flagged = {(a, f) for a, f, _ in audit["flags"]}
    assert flagged <= ARGUED, flagged - ARGUED
    for a in ("low_slow", "mimic", "night", "compromised"):  # the human-like ones: nothing close
        assert max(r["auc"] for r in audit["archetypes"][a]["fields"].values()) < FLAG_AUC, a


def test_time_zones_do_not_name_an_archetype(sim: Simulation, clicks: list[dict]) -> None:
    tz = np.array([c["tz_offset_min"] if c["tz_offset_min"] is not None else -9999 for c in clicks])
    human = _arch(sim, "human")
    farm = _arch(sim, "app_farm")
    assert 0.3 < (tz[farm] == 480).mean() < 0.8  # the farm's own zone, not all of it
    assert (tz[human] == 480).sum() > 0 and (tz[human] == 0).mean() > 0.03  # travellers, UTC browsers
    assert abs((tz[human] == -9999).mean() - 0.1) < 0.02
    bots = sim.is_bot
    assert 0.05 < (tz[bots] == -9999).mean() < 0.2
    for a in ARCHETYPES[1:]:  # no archetype always or never sends one (presence is drawn per session)
        m = _arch(sim, a)
        n_sess = len({clicks[i]["session_id"] for i in np.flatnonzero(m).tolist()})
        none = (tz[m] == -9999).mean()
        assert none < 0.5 and (none > 0 or n_sess < 50), (a, none, n_sess)


def test_vpn_humans_share_the_bots_data_centre_ranges(sim: Simulation, folder: Path, clicks: list[dict]) -> None:
    dcp = load_dataset(folder).datacenter_prefixes
    ip = np.array([c["ip"] for c in clicks])
    p24 = np.array([x.rsplit(".", 1)[0] for x in ip.tolist()])
    dc = np.isin(p24, list(dcp))
    human_dc = dc & ~sim.is_bot
    assert human_dc.mean() > 0.01
    assert set(p24[human_dc]) & set(p24[_arch(sim, "dc_rotation")])  # shared ranges
    assert len({x.rsplit(".", 1)[1] for x in ip[human_dc].tolist()}) > 10  # not all .1
    users: dict[str, set[str]] = defaultdict(set)
    for i in np.flatnonzero(human_dc).tolist():
        users[ip[i]].add(_ukey(clicks[i]))
    assert max(len(u) for u in users.values()) >= 5  # an exit carries many humans


def test_vpn_popularity_does_not_follow_the_bots_ranges() -> None:
    """The ranges no bot rents are not the people's favourite VPN ranges (they were: 35% of the VPN humans on the
    8 of 64 bot-free ranges, and dc_rotation's /24 alone reached AUC 0.982 on default seed 7)."""
    from models.data.simulate import World

    sc = load_scenario("small")
    shares = []
    for seed in range(8):
        w = World(sc, seed)
        n_free = len(w.vpn24)
        assert set(w.vpn24.tolist()) == set(w.dc24[:n_free].tolist())  # the bot-free ranges
        shares.append(float(w.vpn_w[:n_free].sum()) / (n_free / len(w.dc24)))
    assert 0.5 < float(np.mean(shares)) < 1.5, shares  # about their share of the ranges, no more


def test_compromised_scripted_user_agents_per_run(sim: Simulation, clicks: list[dict]) -> None:
    from models.data.simulate import SCRIPTED_UA

    scripted = {u for lst in SCRIPTED_UA.values() for u in lst}
    comp = np.flatnonzero(_arch(sim, "compromised")).tolist()
    per_run: dict[str, set[bool]] = defaultdict(set)
    for i in comp:
        per_run[clicks[i]["session_id"]].add(clicks[i]["user_agent"] in scripted)
    assert all(len(v) == 1 for v in per_run.values())  # one kind per run ...
    kinds = [next(iter(v)) for v in per_run.values()]
    assert 0 < sum(kinds) < len(kinds)  # ... both kinds among the runs of one simulation


def test_bots_move_to_new_targets() -> None:
    from models.data.audit import target_rotation

    def share(sc: dict) -> float:  # at the scenario's own volume: at 60k clicks (0.2x) a day's few bot ads are
        s = simulate(sc, SEED)  # new by chance alone (seed 7, rotation on vs off: 0.43 vs 0.34; at 300k 0.18 vs 0.06)
        ads = np.array([orjson.loads(x)["ad_id"] for x in s.click_lines()], dtype=object)
        cols = {"ts": s.ts, "start_ms": s.meta["start_ms"], "ad": ads,
                "archetype": np.array(ARCHETYPES, dtype=object)[s.archetype]}
        tr = target_rotation(cols)
        assert tr is not None
        return float(tr["new_vs_earlier_days"])

    rotating = load_scenario("default")
    assert rotating["targets"]["rotate_share"] > 0
    fixed = rotating | {"targets": {"rotate_share": 0.0, "new_ads_per_day": 0.0, "new_ad_pick": 0.0}}
    assert share(rotating) > share(fixed) + 0.1


def test_target_settings_change_only_the_ads() -> None:
    """Rotation on or off gives the same clicks but for the ad (and its campaign, advertiser, price): the model
    never sees an ad, so a recall moved by turning rotation on would be a giveaway the rotation added; issue 17
    saw one move (compromised 0.024 -> 0.318 on seed 7) while the whole world was re-drawn behind it."""
    rotating = load_scenario("default")
    fixed = rotating | {"targets": {"rotate_share": 0.0, "new_ads_per_day": 0.0, "new_ad_pick": 0.0}}
    a, b = simulate(rotating, SEED, clicks=30_000), simulate(fixed, SEED, clicks=30_000)
    ad_fields = ("ad_id", "campaign_id", "advertiser_id", "cpc")
    ca, cb = [orjson.loads(x) for x in a.click_lines()], [orjson.loads(x) for x in b.click_lines()]
    assert len(ca) == len(cb)
    assert all({k: v for k, v in x.items() if k not in ad_fields} == {k: v for k, v in y.items() if k not in ad_fields}
               for x, y in zip(ca, cb, strict=True))
    moved = [x["ad_id"] != y["ad_id"] for x, y in zip(ca, cb, strict=True)]
    assert sum(moved) > 0.05 * int(a.is_bot.sum()) and not any(np.array(moved)[~a.is_bot])  # bots' ads only
    assert a.purchases == b.purchases and a.truth == b.truth and a.customers == b.customers


def test_a_residential_botnets_waves_work_ads_of_their_own() -> None:
    """A net's waves are jobs with their own targets: more than a net's two ads per slice and day (a net kept two
    ads for days; default seed 11's test day was all on ads it had clicked before, ad alone at AUC 0.994)."""
    s = simulate("default", SEED, clicks=60_000)
    c = [orjson.loads(x) for x in s.click_lines()]
    resi = np.flatnonzero(_arch(s, "resi_botnet")).tolist()
    ads: dict[tuple[str, int], set[str]] = defaultdict(set)
    for i in resi:
        ads[(c[i]["platform"], (c[i]["ts"] - s.meta["start_ms"]) // DAY_MS)].add(c[i]["ad_id"])
    assert len(ads) >= 8 and np.mean([len(v) for v in ads.values()]) > 3


def test_bots_still_prefer_expensive_ads(sim: Simulation, clicks: list[dict]) -> None:
    cpc = np.array([c["cpc"] for c in clicks])
    assert np.median(cpc[sim.is_bot]) > 1.3 * np.median(cpc[~sim.is_bot])


def test_meta_names_the_simulator_version(sim: Simulation) -> None:
    from models.data.simulate import SIMULATOR_VERSION

    assert sim.meta["simulator_version"] == SIMULATOR_VERSION >= 2
