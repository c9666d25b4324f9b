"""Seeded, vectorised traffic simulator with ground truth (``slidr simulate``).

One call builds a whole dataset folder (layout: docs/design.md): clicks, purchases, customer profiles with RFM,
data-centre IP ranges, ground truth and meta. Everything is drawn from one ``numpy.random.Generator`` seeded
with ``seed`` in a fixed order, so the same scenario and seed give byte-identical files.

The world:
- an ad catalogue: advertisers with their own price level, campaigns, ads, per-platform placements;
- humans: logged-in customers (RFM profile, heavy-tailed activity, so some busy humans click a lot) and
  anonymous visitors; sessions of a few clicks with log-normal gaps; diurnal and weekly rhythms in the
  visitor's local time that differ by slice (a few % of devices abroad, in other zones); home IPs, carrier
  NAT / office / campus gateways shared by many humans, and some corporate- and consumer-VPN humans on
  data-centre exits, in the very ranges the bots rent (so the data-centre flag alone is not decisive);
- purchases after a few % of human clicks (more for high-RFM customers), minutes to hours later; purchases
  falling into a label outage window are dropped (and the window recorded in meta.json);
- bots (archetypes below), essentially never purchasing (``purchase.bot_accident_rate``);
- a drift: a new archetype that appears only from a given day on.

Archetypes (truth.jsonl ``archetype``): ``human`` and
- ``bursty``      bursts of tens to hundreds of clicks a second or two apart, scripted user agents;
- ``low_slow``    one click every 20-120 min around the clock from a fixed residential IP: few clicks/hour;
- ``dc_rotation`` every click from another data-centre IP, a fresh session every 1-3 clicks, UTC clock;
- ``resi_botnet`` residential-proxy botnet: many residential IPs with 1-3 clicks each, in waves (jobs), each
                  wave on a few ads of its own;
- ``compromised`` logged-in real customers' accounts driven from proxies at a high rate;
- ``mimic``       human-like sessions, real user agents and the human diurnal rhythm, high-priced ads;
- ``night``       sessions in the visitor's local night (0-5 h);
- ``app_farm``    (the default drift) device farm: many app devices behind a few IPs; about half the devices
                  keep the farm's own (foreign) time zone, the rest were set to the market's.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from models.data.dataset import write_dataset
from schemas.events import PLATFORMS, SLICES

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
MIN_MS = 60_000
NO_TZ = -9999  # sentinel for "tz_offset_min unknown" in the int column

# version of the simulated world, in meta.json ("simulator_version"); bumped whenever the same scenario and seed
# give different traffic. 2 (issue 17): no one-field giveaways (time zones, VPN exits shared with bots,
# scripted user agents per run), target rotation, mimic's diurnal curve
SIMULATOR_VERSION = 3
# 3: the bots' target ads drawn from a stream of their own (World.target_rng); VPN range popularity in an order
# of its own (not the bot-free ranges first), a residential botnet's target ads per wave (job), not per net;
# target rotation on in the clean and heavy-bots scenarios too; the main stream keeps version 2's draws (bot_ads)
TARGET_STREAM = 1  # second word of the target stream's seed: PCG64([seed, TARGET_STREAM])
VPN_STREAM = 2  # and of the VPN ranges' popularity order

ARCHETYPES = ("human", "bursty", "low_slow", "dc_rotation", "resi_botnet", "compromised", "mimic", "night",
              "app_farm")

# ---- defaults of every scenario knob (a scenario file overrides any of them, nested dicts merge) ---------------
DEFAULTS: dict[str, Any] = {
    "name": "custom",
    "start": "2026-11-02T00:00:00Z",  # a Monday, fixed so output is reproducible
    "days": 4,
    "clicks": 300_000,
    # share of all clicks per slice, and the bot share inside each slice
    "slices": {
        "desktop:in":  {"share": 0.18, "bot_share": 0.06},
        "desktop:out": {"share": 0.17, "bot_share": 0.25},
        "mobile:in":   {"share": 0.20, "bot_share": 0.05},
        "mobile:out":  {"share": 0.20, "bot_share": 0.18},
        "app:in":      {"share": 0.15, "bot_share": 0.04},
        "app:out":     {"share": 0.10, "bot_share": 0.14},
    },
    # archetype mix (relative weights) of the bot clicks in each slice
    "archetypes": {
        "desktop:in":  {"bursty": 1, "low_slow": 1, "compromised": 3, "mimic": 2, "night": 1},
        "desktop:out": {"bursty": 2, "low_slow": 2, "dc_rotation": 3, "resi_botnet": 2, "mimic": 1, "night": 1},
        "mobile:in":   {"compromised": 3, "mimic": 1, "low_slow": 1},
        "mobile:out":  {"resi_botnet": 3, "low_slow": 1, "mimic": 2, "night": 1, "bursty": 1},
        "app:in":      {"compromised": 2, "bursty": 1, "mimic": 1},
        "app:out":     {"bursty": 2, "resi_botnet": 2, "night": 1, "low_slow": 1, "dc_rotation": 1},
    },
    # a new archetype from day `day` (fraction of the slice's bot clicks from then on); null = none
    "drift": None,
    # purchase-label outages: [{"day": d, "hour": h, "hours": n}] (UTC, from the start)
    "label_outages": [],
    "purchase": {
        "rate": 0.03,                # base share of human clicks followed by a purchase
        "anon_factor": 0.5,          # anonymous visitors buy less
        "rfm_gain": 2.0,             # logged-in multiplier = 0.3 + rfm_gain * rfm_score
        "delay_median_min": 25.0,    # click -> purchase delay: log-normal, minutes to hours
        "delay_sigma": 1.2,
        "bot_accident_rate": 0.0002, # accidental purchases on bot clicks
    },
    "humans": {
        "clicks_per_customer": 14.0, # sets the number of customers from the logged-in human volume
        "session_clicks_mean": 3.5,  # clicks per session (1 + geometric)
        "gap_median_s": 40.0,        # within-session gaps: log-normal
        "gap_sigma": 1.1,
        "visitor_sessions_mean": 1.6,  # sessions per anonymous visitor
        "tz_known": 0.9,             # share of clicks carrying tz_offset_min
        "tz_abroad": 0.03,           # travellers and expatriates: a device clock in a foreign zone (ABROAD_TZ)
        "tz_utc": 0.02,              # privacy-hardened browsers (Tor, Firefox resistFingerprinting ...) report UTC
        "office_share": 0.22,        # desktop users with an office gateway (used in working hours)
        "vpn_share": 0.08,           # users on a corporate or consumer VPN (data-centre exits shared with bots)
        "nat_share": {"mobile": 0.75, "app": 0.55},  # sessions through a carrier NAT gateway
    },
    "bots": {
        # share of each archetype's sessions carrying tz_offset_min (humans: humans.tz_known): the page's script
        # reports the zone for bots driving real or headless browsers as for humans; a bare HTTP client sends none
        "tz_known": {"bursty": 0.85, "low_slow": 0.9, "dc_rotation": 0.88, "resi_botnet": 0.9, "compromised": 0.9,
                     "mimic": 0.9, "night": 0.9, "app_farm": 0.9},
    },
    # bots' target ads (price-weighted, price squared): each day a share of the bot entities moves to new targets
    # (budgets run out, rules block an ad), and from day 1 on each day brings `new_ads_per_day` (share of the
    # catalogue) ads no bot could target before; a moving entity takes each of its targets among that day's new
    # ads with probability `new_ad_pick`. All 0: every entity keeps the targets it drew on its first day.
    "targets": {"rotate_share": 0.0, "new_ads_per_day": 0.0, "new_ad_pick": 0.0},
    "catalog": {"advertisers": 30, "campaigns": [2, 5], "ads": [2, 6]},
    "network": {"carriers": 3, "nat_ips_per_100k": 12, "offices": 60, "campuses": 8, "dc_ranges": 64},
}

# local-time rhythms: hourly weights (24) and weekly weights (Mon..Sun)
_H = np.arange(24)


def _bump(mu: float, sd: float) -> np.ndarray:
    d = np.minimum(np.abs(_H - mu), 24 - np.abs(_H - mu))
    return np.exp(-0.5 * (d / sd) ** 2)


HOURLY = {
    "desktop": 0.05 + 1.0 * _bump(11, 2.5) + 0.9 * _bump(15, 2.5) + 0.5 * _bump(21, 2),
    "mobile": 0.05 + 0.5 * _bump(8, 1.5) + 0.5 * _bump(12.5, 1.5) + 1.2 * _bump(21, 2.2),
    "app": 0.08 + 0.3 * _bump(8, 1.5) + 0.4 * _bump(13, 2) + 1.3 * _bump(21.5, 2.0),
}
WEEKLY = {
    "desktop": np.array([1.1, 1.1, 1.1, 1.05, 1.0, 0.7, 0.65]),
    "mobile": np.array([0.9, 0.9, 0.9, 0.95, 1.05, 1.25, 1.2]),
    "app": np.array([0.85, 0.85, 0.9, 0.95, 1.1, 1.35, 1.3]),
}
HUMAN_OUT_SHIFT_H = 1  # logged-out humans' diurnal curve runs an hour later than logged-in ones'
NIGHT_HOURLY = np.where(_H < 5, 1.0, 0.0) + np.where(_H == 5, 0.3, 0.0)
FLAT_HOURLY = np.ones(24)

TZ_CHOICES = np.array([-300, -360, -420, -480, -600, 0, 60])
TZ_P = np.array([0.43, 0.25, 0.1, 0.16, 0.02, 0.02, 0.02])
# zones of travellers' and expatriates' devices (humans.tz_abroad), +480 (China, Singapore, Perth ...) included
ABROAD_TZ = np.array([-180, 0, 60, 120, 180, 240, 330, 420, 480, 540, 600])
# a device farm's own zone (its devices keep it unless the operator set them to the target market's)
FARM_TZ = 480

M5, KH, KS = "Mozilla/5.0", "AppleWebKit/537.36 (KHTML, like Gecko)", "AppleWebKit/605.1.15 (KHTML, like Gecko)"
UA = {
    "desktop": [
        f"{M5} (Windows NT 10.0; Win64; x64) {KH} Chrome/131.0.0.0 Safari/537.36",
        f"{M5} (Windows NT 10.0; Win64; x64) {KH} Chrome/130.0.0.0 Safari/537.36",
        f"{M5} (Macintosh; Intel Mac OS X 10_15_7) {KH} Chrome/131.0.0.0 Safari/537.36",
        f"{M5} (Macintosh; Intel Mac OS X 14_6) {KS} Version/18.1 Safari/605.1.15",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:132.0) Gecko/20100101 Firefox/132.0",
        f"{M5} (Windows NT 10.0; Win64; x64) {KH} Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    ],
    "mobile": [
        f"{M5} (iPhone; CPU iPhone OS 18_1 like Mac OS X) {KS} Version/18.1 Mobile/15E148 Safari/604.1",
        f"{M5} (iPhone; CPU iPhone OS 17_6 like Mac OS X) {KS} Version/17.6 Mobile/15E148 Safari/604.1",
        f"{M5} (Linux; Android 14; Pixel 8) {KH} Chrome/131.0.0.0 Mobile Safari/537.36",
        f"{M5} (Linux; Android 14; SM-S921B) {KH} SamsungBrowser/26.0 Chrome/122.0.0.0 Mobile Safari/537.36",
        f"{M5} (Linux; Android 13; SM-A536B) {KH} Chrome/130.0.0.0 Mobile Safari/537.36",
    ],
    "app": [
        "ShopApp/5.12.0 (iPhone15,2; iOS 18.1; Scale/3.00)",
        "ShopApp/5.12.0 (iPhone14,5; iOS 17.6; Scale/3.00)",
        "ShopApp/5.11.2 (Android 14; Pixel 8; Build/AP2A)",
        "ShopApp/5.12.0 (Android 14; SM-S921B; Build/UP1A)",
        "ShopApp/5.10.4 (Android 13; SM-A536B; Build/TP1A)",
    ],
}
SCRIPTED_UA = {
    "desktop": ["python-requests/2.32.3", "curl/8.5.0", "Go-http-client/1.1",
                f"{M5} (X11; Linux x86_64) {KH} HeadlessChrome/131.0.0.0 Safari/537.36",
                "Mozilla/5.0 (compatible; MSIE 9.0; Windows NT 6.1; Trident/5.0)", ""],
    "mobile": [f"{M5} (Linux; Android 8.0.0; SM-G930F) {KH} Chrome/80.0.3987.99 Mobile Safari/537.36",
               f"{M5} (iPhone; CPU iPhone OS 12_0 like Mac OS X) {KS} Mobile/15E148",
               "python-requests/2.31.0", ""],
    "app": ["okhttp/4.12.0", "Dalvik/2.1.0 (Linux; U; Android 9; SM-G960F Build/PPR1.180610.011)",
            "ShopApp/4.2.0 (Android 9; generic_x86; Build/PSR1)", "CFNetwork/1494.0.7 Darwin/23.4.0"],
}
PLACEMENTS = {
    # platform: (names, probabilities, price multipliers)
    "desktop": (["search_top", "search_side", "product_detail", "homepage"], [0.4, 0.2, 0.3, 0.1],
                [1.3, 0.8, 1.0, 0.7]),
    "mobile": (["search_top", "product_detail", "mobile_banner"], [0.5, 0.35, 0.15], [1.2, 1.0, 0.6]),
    "app": (["app_search", "app_feed", "app_interstitial"], [0.45, 0.4, 0.15], [1.2, 0.9, 0.6]),
}
# first octets of synthetic address spaces (disjoint)
RESIDENTIAL_OCTETS = np.array([24, 47, 67, 68, 69, 71, 73, 75, 76, 96, 97, 98, 99, 108, 173])
CARRIER_OCTETS = np.array([172, 174, 166])  # one per carrier
OFFICE_OCTETS = np.array([12, 63, 65, 192])
VPN_EXITS = 4  # exit addresses per VPN range
DC_OCTETS = np.array([3, 13, 18, 34, 35, 45, 52, 54, 104, 138, 139, 143, 157, 159, 167, 178])


# ---------------------------------------------------------------------------------------------------------------
# scenarios


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("archetypes",):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


SCENARIO_DIR = Path(__file__).parent / "scenarios"


def builtin_scenarios() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.json"))


def load_scenario(name_or_file: str | Path | dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """A scenario dict: a built-in name (``default``, ``small`` ...), a JSON file path, or a dict; merged over
    :data:`DEFAULTS`; keyword overrides (``clicks=``, ``days=`` ...) win when not None."""
    if isinstance(name_or_file, dict):
        over = name_or_file
    elif Path(name_or_file).suffix == ".json" or Path(name_or_file).exists():
        over = orjson.loads(Path(name_or_file).read_bytes())
    else:
        f = SCENARIO_DIR / f"{name_or_file}.json"
        if not f.is_file():
            raise ValueError(f"unknown scenario {name_or_file!r}; built-in: {', '.join(builtin_scenarios())}")
        over = orjson.loads(f.read_bytes())
    sc = _merge(DEFAULTS, over)
    for k, v in overrides.items():
        if v is not None:
            sc[k] = v
    _check(sc)
    return sc


def _check(sc: dict[str, Any]) -> None:
    if set(sc["slices"]) != set(SLICES):
        raise ValueError(f"scenario slices must be exactly {SLICES}")
    for s, mix in sc["archetypes"].items():
        for a in mix:
            if a not in ARCHETYPES[1:]:
                raise ValueError(f"unknown archetype {a!r} in slice {s}")
            if a == "compromised" and s.endswith(":out"):
                raise ValueError("compromised accounts are logged in: only in ':in' slices")
    if set(sc["bots"]["tz_known"]) != set(ARCHETYPES[1:]):
        raise ValueError(f"bots.tz_known must name exactly the archetypes {ARCHETYPES[1:]}")
    if sc["drift"] and sc["drift"]["archetype"] not in ARCHETYPES[1:]:
        raise ValueError(f"unknown drift archetype {sc['drift']['archetype']!r}")


# ---------------------------------------------------------------------------------------------------------------
# building blocks


@dataclass
class Chunk:
    """Clicks from one generator (all column arrays have the same length)."""

    ts: np.ndarray        # int64 ms
    session: np.ndarray   # object: session id / visitor key
    customer: np.ndarray  # object: customer id or None
    ip: np.ndarray        # uint32
    ua: np.ndarray        # object
    tz: np.ndarray        # int32, NO_TZ = unknown
    ad: np.ndarray        # int32 index into the catalogue
    platform: int         # index into PLATFORMS
    archetype: int        # index into ARCHETYPES


class World:
    """Shared state of one simulation: rng, time window, catalogue, address pools."""

    def __init__(self, sc: dict[str, Any], seed: int) -> None:
        self.sc = sc
        self.rng = np.random.Generator(np.random.PCG64(seed))
        # the bots' target ads come from a stream of their own: the targets settings (rotation on or off, its
        # rates) change which ads bots click and nothing else, so two scenarios differing only there give the
        # very same clicks otherwise (the same features: the model never sees an ad) and compare like for like
        self.target_rng = np.random.Generator(np.random.PCG64([seed, TARGET_STREAM]))
        start = datetime.fromisoformat(sc["start"].replace("Z", "+00:00"))
        self.start_ms = int(start.timestamp() * 1000)
        self.start_dow = start.weekday()
        self.days = float(sc["days"])
        self.span_ms = int(self.days * DAY_MS)
        self.end_ms = self.start_ms + self.span_ms
        self._catalog()
        self._network(seed)
        self._used_ids: set[str] = set()

    # ---- ids ---------------------------------------------------------------------------------------------------
    def ids(self, n: int, width: int = 16) -> np.ndarray:
        """n opaque random hex ids (object array), unique within the simulation."""
        raw = self.rng.integers(0, 2**62, size=n, dtype=np.int64)
        out = [f"{x:0{width}x}"[-width:] for x in raw.tolist()]
        for i, s in enumerate(out):  # practically never loops, keeps uniqueness certain and deterministic
            while s in self._used_ids:
                s = f"{int(self.rng.integers(0, 2**62)):0{width}x}"[-width:]
                out[i] = s
            self._used_ids.add(s)
        return np.array(out, dtype=object)

    # ---- catalogue ---------------------------------------------------------------------------------------------
    def _catalog(self) -> None:
        r, c = self.rng, self.sc["catalog"]
        ad_adv: list[int] = []
        ad_camp: list[int] = []
        ad_cpc: list[float] = []
        ad_ids: list[str] = []
        camp_ids: list[str] = []
        adv_ids: list[str] = []
        n_camp = 0
        for a in range(int(c["advertisers"])):
            price = float(np.exp(r.normal(-0.3, 0.7)))  # advertiser's price level, ~$0.2-$4 per click
            for _ in range(int(r.integers(c["campaigns"][0], c["campaigns"][1] + 1))):
                cf = float(np.exp(r.normal(0, 0.3)))
                for _ in range(int(r.integers(c["ads"][0], c["ads"][1] + 1))):
                    ad_adv.append(a)
                    ad_camp.append(n_camp)
                    ad_cpc.append(price * cf)
                    ad_ids.append(f"ad-{len(ad_ids) + 1:05d}")
                    camp_ids.append(f"cmp-{n_camp + 1:04d}")
                    adv_ids.append(f"adv-{a + 1:03d}")
                n_camp += 1
        self.ad_ids = np.array(ad_ids, dtype=object)
        self.camp_ids = np.array(camp_ids, dtype=object)
        self.adv_ids = np.array(adv_ids, dtype=object)
        self.ad_adv = np.array(ad_adv)
        self.ad_cpc = np.array(ad_cpc)
        n_ads = len(ad_ids)
        pop = 1.0 / np.arange(1, n_ads + 1) ** 0.8  # human popularity: Zipf-like over a shuffled order
        self.ad_pop = pop[r.permutation(n_ads)]
        self.ad_pop /= self.ad_pop.sum()
        rich = self.ad_cpc ** 2  # bots prefer expensive clicks
        self.ad_rich = rich / rich.sum()
        # first day bots may target each ad (targets.new_ads_per_day of the catalogue opens each day from day 1)
        self.n_days = max(1, math.ceil(self.days))
        self.ad_bot_day = np.zeros(n_ads, dtype=np.int64)
        per_day = round(float(self.sc["targets"]["new_ads_per_day"]) * n_ads)
        for d in range(1, self.n_days):
            free = np.flatnonzero(self.ad_bot_day == 0)
            if per_day and len(free) > per_day:
                self.ad_bot_day[self.target_rng.choice(free, size=per_day, replace=False)] = d

    def human_ads(self, n: int) -> np.ndarray:
        return self.rng.choice(len(self.ad_pop), size=n, p=self.ad_pop).astype(np.int32)

    def bot_ads(self, ent: np.ndarray, ts: np.ndarray, k: int = 3, main_ent: np.ndarray | None = None
                ) -> np.ndarray:
        """Each bot entity targets k ads drawn by price; its clicks (at times ``ts``) pick among those.

        An entity draws its targets on its first day and again on each later day it moves (probability
        ``targets.rotate_share`` per day), among the ads open to bots that day, taking that day's new ads with
        probability ``targets.new_ad_pick`` per target. All of it from the target stream; the main stream makes
        the draws version 2 made here with rotation off (for ``main_ent``, default ``ent``) and drops them, so
        every other draw of a world stays where it was (seed-pinned figures of scenarios without rotation, the
        small one's tests among them, keep their world).
        """
        self._v2_draws(ent if main_ent is None else main_ent, len(ent), k)
        r, tg, nd = self.target_rng, self.sc["targets"], self.n_days
        n, n_ent = len(ent), (int(ent.max()) + 1 if len(ent) else 1)
        n_ads = len(self.ad_rich)
        day = np.clip((np.asarray(ts, dtype=np.int64) - self.start_ms) // DAY_MS, 0, nd - 1)
        first = np.full(n_ent, nd - 1, dtype=np.int64)
        np.minimum.at(first, ent, day)
        moved = r.random((n_ent, nd)) < float(tg["rotate_share"])
        moved[np.arange(n_ent), first] = True
        draw_day = np.maximum.accumulate(np.where(moved, np.arange(nd), -1), axis=1)  # day of the current targets
        targets = np.empty((nd, n_ent, k), dtype=np.int64)
        for d in range(nd):
            p = np.where(self.ad_bot_day <= d, self.ad_rich, 0.0)
            t = r.choice(n_ads, size=(n_ent, k), p=p / p.sum())
            new = (self.ad_bot_day == d) & (d > 0)
            if new.any():
                take = r.random((n_ent, k)) < float(tg["new_ad_pick"])
                pn = np.where(new, self.ad_rich, 0.0)
                t[take] = r.choice(n_ads, size=int(take.sum()), p=pn / pn.sum())
            targets[d] = t
        pick = r.integers(0, k, size=n)
        return targets[np.maximum(draw_day[ent, day], 0), ent, pick].astype(np.int32)

    def _v2_draws(self, ent: np.ndarray, n: int, k: int) -> None:
        """The main-stream draws of version 2's ``bot_ads`` without rotation (dropped: see ``bot_ads``)."""
        n_ent = int(ent.max()) + 1 if len(ent) else 1
        self.rng.random((n_ent, self.n_days))
        for _ in range(self.n_days):
            self.rng.choice(len(self.ad_rich), size=(n_ent, k), p=self.ad_rich)
        self.rng.integers(0, k, size=n)

    # ---- addresses ---------------------------------------------------------------------------------------------
    def _addr(self, octets: np.ndarray, n: int) -> np.ndarray:
        first = self.rng.choice(octets, size=n).astype(np.uint32)
        rest = self.rng.integers(1, 2**24 - 1, size=n, dtype=np.uint32)
        return (first << 24) | rest

    def residential(self, n: int) -> np.ndarray:
        return self._addr(RESIDENTIAL_OCTETS, n)

    def _network(self, seed: int) -> None:
        r, net = self.rng, self.sc["network"]
        n_nat = max(4, int(net["nat_ips_per_100k"] * self.sc["clicks"] / 100_000))
        self.nat = [self._addr(CARRIER_OCTETS[c % len(CARRIER_OCTETS): c % len(CARRIER_OCTETS) + 1], n_nat)
                    for c in range(int(net["carriers"]))]
        self.nat_w = 1.0 / np.arange(1, n_nat + 1) ** 0.7
        self.nat_w /= self.nat_w.sum()
        self.offices = self._addr(OFFICE_OCTETS, int(net["offices"]) + int(net["campuses"]))
        dc24 = self._addr(DC_OCTETS, int(net["dc_ranges"])) & np.uint32(0xFFFFFF00)
        self.dc24 = np.unique(dc24)
        r.shuffle(self.dc24)
        n_vpn = max(2, len(self.dc24) // 8)
        self.vpn24, self.botdc24 = self.dc24[:n_vpn], self.dc24[n_vpn:]
        # VPN exits: a few fixed addresses in each data-centre /24 (the bots' ranges included), each shared by
        # many humans; a provider or company has one range, bigger ones carry more people (Zipf-like), in an
        # order of their own: VPN providers rent from the hosting companies bots rent from, so how popular a range
        # is with people says nothing about whether bots rent it too (the ranks once followed dc24's order, which
        # made the 8 bot-free ranges the most popular ones: 36% of the human data-centre clicks in dc_rotation's
        # slices, default seed 7, and its /24 alone reached AUC 0.982)
        self.vpn_exits = self.dc24[:, None] | r.integers(2, 254, size=(len(self.dc24), VPN_EXITS), dtype=np.uint32)
        vw = 1.0 / np.arange(1, len(self.dc24) + 1) ** 0.6
        vw = vw[np.random.Generator(np.random.PCG64([seed, VPN_STREAM])).permutation(len(vw))]
        self.vpn_w = vw / vw.sum()

    def dc_ips(self, n: int, ranges: np.ndarray) -> np.ndarray:
        base = self.rng.choice(ranges, size=n)
        return base | self.rng.integers(2, 254, size=n, dtype=np.uint32)

    # ---- time --------------------------------------------------------------------------------------------------
    def times(self, n: int, hourly: np.ndarray, weekly: np.ndarray, tz: np.ndarray,
              t0: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """n event times (UTC ms) following local-time rhythms; also returns the local hour of each.

        Local days are drawn by weekday weight, hours by ``hourly``; the UTC time wraps inside the window.
        ``t0`` (ms) restricts the times to [t0, end).
        """
        r = self.rng
        n_days = max(1, math.ceil(self.days))
        dw = weekly[(self.start_dow + np.arange(n_days)) % 7]
        if self.days < n_days:  # partial last day weighs less
            dw = dw.copy()
            dw[-1] *= self.days - (n_days - 1)
        day = r.choice(n_days, size=n, p=dw / dw.sum())
        hour = r.choice(24, size=n, p=hourly / hourly.sum())
        local = day * DAY_MS + hour * HOUR_MS + r.integers(0, HOUR_MS, size=n)
        tzm = np.where(tz == NO_TZ, 0, tz).astype(np.int64)
        lo = (t0 - self.start_ms) if t0 is not None else 0
        span = self.span_ms - lo
        rel = lo + np.mod(local - tzm * MIN_MS - lo, span)
        return self.start_ms + rel.astype(np.int64), hour

    def uniform_times(self, n: int, t0: int | None = None) -> np.ndarray:
        lo = t0 if t0 is not None else self.start_ms
        return self.rng.integers(lo, self.end_ms, size=n, dtype=np.int64)

    def tz(self, n: int) -> np.ndarray:
        return self.rng.choice(TZ_CHOICES, size=n, p=TZ_P).astype(np.int32)

    def human_tz(self, n: int) -> np.ndarray:
        """Humans' device zones: the market's (``tz``), a share abroad (travellers, expatriates), a share
        reporting UTC (privacy-hardened browsers, as cloud machines' clocks do)."""
        h = self.sc["humans"]
        tz = self.tz(n)
        u = self.rng.random(n)
        abroad = u < h["tz_abroad"]
        tz[abroad] = self.rng.choice(ABROAD_TZ, size=int(abroad.sum()))
        tz[(u >= h["tz_abroad"]) & (u < h["tz_abroad"] + h["tz_utc"])] = 0
        return tz

    def ua(self, plat: str, n: int, scripted: bool = False) -> np.ndarray:
        lst = (SCRIPTED_UA if scripted else UA)[plat]
        return np.array(lst, dtype=object)[self.rng.integers(0, len(lst), size=n)]

    def mixed_ua(self, plat: str, n: int, scripted_share: float) -> np.ndarray:
        """n user agents, each scripted with probability ``scripted_share`` (one per run / operation)."""
        scripted = self.rng.random(n) < scripted_share
        return np.where(scripted, self.ua(plat, n, scripted=True), self.ua(plat, n))


def _fit(sizes: np.ndarray, n: int) -> np.ndarray:
    """The leading group sizes that add up to exactly n (the last one cut, or one more group added)."""
    cs = np.cumsum(sizes)
    if len(cs) == 0 or cs[-1] < n:
        return np.r_[sizes, n - (cs[-1] if len(cs) else 0)].astype(np.int64)
    k = int(np.searchsorted(cs, n)) + 1
    out = sizes[:k].copy()
    out[-1] -= int(cs[k - 1] - n)
    return out


def _sessions(w: World, n: int, mean_clicks: float, gap_median_s: float, gap_sigma: float
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split n clicks into sessions. Returns (session index per click, click offset ms in session, n_sessions)."""
    r = w.rng
    p = 1.0 / max(mean_clicks, 1.0)
    sizes = r.geometric(p, size=int(n / mean_clicks * 1.3) + 10)
    sizes = _fit(sizes, n)
    k = len(sizes)
    sess = np.repeat(np.arange(k), sizes)
    gaps = np.exp(r.normal(math.log(gap_median_s * 1000), gap_sigma, size=n)).astype(np.int64)
    first = np.r_[0, np.cumsum(sizes)[:-1]]
    gaps[first] = 0
    cum = np.cumsum(gaps)
    offset = cum - np.repeat(cum[first], sizes)
    return sess, offset, np.array(k)


# ---------------------------------------------------------------------------------------------------------------
# humans


@dataclass
class Customers:
    ids: np.ndarray        # object
    rfm: np.ndarray        # float
    activity: np.ndarray   # sampling weight of sessions
    rows: list[dict[str, Any]]


def _make_customers(w: World, n: int) -> Customers:
    r = w.rng
    freq = r.negative_binomial(1.0, 0.15, size=n)  # orders in the last year: many 0-3, a tail of frequent buyers
    aov = np.exp(r.normal(3.6, 0.6, size=n))        # average order value ~ $37
    monetary = np.round(freq * aov, 2)
    recency = np.where(freq > 0, np.clip(r.exponential(60, size=n) / np.sqrt(freq + 1), 1, 365), 365).round(1)
    age = np.clip(1 + r.exponential(700, size=n), 1, 3650).round(0)
    recency = np.minimum(recency, age)
    score = (np.exp(-recency / 90) + (1 - np.exp(-freq / 12)) + (1 - np.exp(-monetary / 800))) / 3
    score = np.round(score, 4)
    activity = np.exp(r.normal(0, 1.1, size=n)) * (0.3 + score)  # heavy tail: busy humans
    ids = np.array([f"cu{x}" for x in w.ids(n, 12)], dtype=object)
    rows = [{"customer_id": i, "rfm_score": float(s), "recency_days": float(rc), "frequency": int(f),
             "monetary": float(m), "account_age_days": int(a)}
            for i, s, rc, f, m, a in zip(ids.tolist(), score.tolist(), recency.tolist(), freq.tolist(),
                                          monetary.tolist(), age.tolist(), strict=True)]
    return Customers(ids, score, activity / activity.sum(), rows)


def _fake_accounts(w: World, n: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Accounts created or bought by bot operators: new ones, and aged ones with a token history."""
    r = w.rng
    aged = r.random(n) < 0.5
    age = np.where(aged, r.integers(30, 900, size=n), r.integers(0, 21, size=n))
    freq = np.where(aged, r.integers(0, 3, size=n), 0)
    monetary = np.round(freq * np.exp(r.normal(3.0, 0.5, size=n)), 2)
    recency = np.where(freq > 0, np.minimum(r.integers(20, 300, size=n), np.maximum(age, 1)), 365).astype(float)
    score = np.round((np.exp(-recency / 90) + (1 - np.exp(-freq / 12)) + (1 - np.exp(-monetary / 800))) / 3, 4)
    ids = np.array([f"cu{x}" for x in w.ids(n, 12)], dtype=object)
    rows = [{"customer_id": i, "rfm_score": float(s), "recency_days": float(rc), "frequency": int(f),
             "monetary": float(m), "account_age_days": int(a)}
            for i, s, rc, f, m, a in zip(ids.tolist(), score.tolist(), recency.tolist(), freq.tolist(),
                                          monetary.tolist(), age.tolist(), strict=True)]
    return ids, rows


@dataclass
class People:
    """Per-user attributes shared by customers (all platforms) and visitors (one platform)."""

    home: np.ndarray     # uint32 home IP
    office: np.ndarray   # uint32 office/campus IP, 0 = none
    vpn: np.ndarray      # int index into World.dc24 of the person's VPN range, -1 = none
    carrier: np.ndarray  # int
    tz: np.ndarray       # int32
    ua: np.ndarray       # int (n, 3): user agent index per platform


def _people(w: World, n: int) -> People:
    r, h = w.rng, w.sc["humans"]
    office = np.zeros(n, dtype=np.uint32)
    u = r.random(n)
    is_office = u < h["office_share"]
    is_vpn = (u >= h["office_share"]) & (u < h["office_share"] + h["vpn_share"])
    # offices/campuses: many humans share one gateway, popularity Zipf-like
    ow = 1.0 / np.arange(1, len(w.offices) + 1) ** 0.6
    office[is_office] = r.choice(w.offices, size=int(is_office.sum()), p=ow / ow.sum())
    vpn = np.full(n, -1, dtype=np.int64)
    vpn[is_vpn] = r.choice(len(w.dc24), size=int(is_vpn.sum()), p=w.vpn_w)
    return People(
        home=w.residential(n), office=office, vpn=vpn, carrier=r.integers(0, len(w.nat), size=n),
        tz=w.human_tz(n), ua=r.integers(0, 1_000_000, size=(n, 3)),
    )


def _humans(w: World, n: int, plat_i: int, logged_in: bool, cust: Customers, cpeople: People,
            slice_shift: float) -> Chunk:
    r, h = w.rng, w.sc["humans"]
    plat = PLATFORMS[plat_i]
    sess, offset, k_arr = _sessions(w, n, h["session_clicks_mean"], h["gap_median_s"], h["gap_sigma"])
    k = int(k_arr)
    if logged_in:
        user = r.choice(len(cust.ids), size=k, p=cust.activity)
        people = cpeople
        sid = w.ids(k)  # a fresh session id per session; the user key is the customer
        customer = cust.ids[user]
        s_ids = sid
    else:
        n_vis = max(1, int(k / h["visitor_sessions_mean"]))
        vw = np.exp(r.normal(0, 0.8, size=n_vis))
        user = r.choice(n_vis, size=k, p=vw / vw.sum())
        people = _people(w, n_vis)
        vis_ids = w.ids(n_vis)
        s_ids = vis_ids[user]  # the visitor key doubles as the session id
        customer = np.full(k, None, dtype=object)
    tz = people.tz[user]
    hourly = np.roll(HOURLY[plat], int(slice_shift))
    start, hour = w.times(k, hourly, WEEKLY[plat], tz)
    # IP per session: carrier NAT (mobile/app), office in working hours, VPN (working hours and 70% of the
    # rest, through one of its range's exits), else home
    ip = people.home[user].copy()
    office = people.office[user]
    work_hours = (hour >= 8) & (hour < 19)
    ip = np.where((office > 0) & work_hours, office, ip)
    vpn = people.vpn[user]
    exit_ip = w.vpn_exits[np.maximum(vpn, 0), r.integers(0, VPN_EXITS, size=k)]
    ip = np.where((vpn >= 0) & (work_hours | (r.random(k) < 0.7)), exit_ip, ip)
    if plat in h["nat_share"]:
        nat = r.random(k) < h["nat_share"][plat]
        gw = np.empty(k, dtype=np.uint32)
        for c, pool in enumerate(w.nat):
            m = people.carrier[user] == c
            gw[m] = r.choice(pool, size=int(m.sum()), p=w.nat_w)
        ip = np.where(nat, gw, ip)
    ua_list = np.array(UA[plat], dtype=object)
    ua = ua_list[people.ua[user, plat_i] % len(ua_list)]
    tz_known = r.random(k) < h["tz_known"]
    tz_s = np.where(tz_known, tz, NO_TZ)
    ts = start[sess] + offset
    return Chunk(ts=ts, session=s_ids[sess], customer=customer[sess], ip=ip[sess], ua=ua[sess],
                 tz=tz_s[sess].astype(np.int32), ad=w.human_ads(n), platform=plat_i, archetype=0)


# ---------------------------------------------------------------------------------------------------------------
# bots: each generator makes n clicks of one archetype in one slice, from t0 (ms) on


def _accounts(w: World, n_ent: int, logged_in: bool, pool: list[np.ndarray], rows: list[dict[str, Any]]
              ) -> np.ndarray:
    if not logged_in:
        return np.full(n_ent, None, dtype=object)
    ids, new_rows = _fake_accounts(w, n_ent)
    pool.append(ids)
    rows.extend(new_rows)
    return ids


def _bursty(w: World, n: int, plat: str, li: bool, t0: int | None, acc: Any) -> dict[str, np.ndarray]:
    r = w.rng
    sizes = r.integers(20, 200, size=n // 20 + 2)
    sizes = _fit(sizes, n)
    k = len(sizes)
    burst = np.repeat(np.arange(k), sizes)
    n_ent = max(1, k // 4)  # each bot runs a few bursts
    ent_of_burst = r.integers(0, n_ent, size=k)
    gaps = (r.exponential(1500, size=n) + 150).astype(np.int64)  # ~1.6 s apart
    first = np.r_[0, np.cumsum(sizes)[:-1]]
    gaps[first] = 0
    cum = np.cumsum(gaps)
    ts = w.uniform_times(k, t0)[burst] + cum - np.repeat(cum[first], sizes)
    ent = ent_of_burst[burst]
    ip_ent = np.where(r.random(n_ent) < 0.5, w.dc_ips(n_ent, w.botdc24), w.residential(n_ent))
    return {"ts": ts, "session": w.ids(k)[burst], "customer": _accounts(w, n_ent, li, *acc)[ent],
            "ip": ip_ent[ent], "ua": w.ua(plat, n_ent, scripted=True)[ent],
            "tz": w.tz(n_ent)[ent], "ad": w.bot_ads(ent, ts, 2)}


def _low_slow(w: World, n: int, plat: str, li: bool, t0: int | None, acc: Any) -> dict[str, np.ndarray]:
    r = w.rng
    lo = t0 if t0 is not None else w.start_ms
    hours = (w.end_ms - lo) / HOUR_MS
    period_min = r.uniform(20, 120, size=n // 10 + 2)  # each bot: one click every 20-120 minutes
    per_ent = np.maximum(1, (hours * 60 / period_min).astype(np.int64))
    per_ent = _fit(per_ent, n)
    k = len(per_ent)
    ent = np.repeat(np.arange(k), per_ent)
    first = np.r_[0, np.cumsum(per_ent)[:-1]]
    idx = np.arange(n) - np.repeat(first, per_ent)
    per = np.resize(period_min, k)[ent] * MIN_MS
    phase = r.uniform(0, 1, size=k)[ent] * per
    ts = (lo + phase + idx * per + r.normal(0, 0.15, size=n) * per).astype(np.int64)
    ts = np.clip(ts, lo, w.end_ms - 1)
    tz = w.tz(k)
    return {"ts": ts, "session": w.ids(k)[ent], "customer": _accounts(w, k, li, *acc)[ent],
            "ip": w.residential(k)[ent], "ua": w.ua(plat, k)[ent], "tz": tz[ent], "ad": w.bot_ads(ent, ts, 4)}


def _dc_rotation(w: World, n: int, plat: str, li: bool, t0: int | None, acc: Any) -> dict[str, np.ndarray]:
    r = w.rng
    # operations: waves of a few hours; each session 1-3 clicks from one data-centre IP, a new IP per session
    n_ops = max(1, n // 400)
    op = r.integers(0, n_ops, size=n)
    op_start = w.uniform_times(n_ops, t0)
    ts = op_start[op] + (r.exponential(1.5, size=n) * HOUR_MS).astype(np.int64)
    ts = np.clip(ts, op_start[op], w.end_ms - 1)
    sess = np.cumsum(r.random(n) < 0.5, dtype=np.int64)  # a new session (and IP) every ~2 clicks
    sess -= sess[0]
    k = int(sess[-1]) + 1
    return {"ts": ts, "session": w.ids(k)[sess], "customer": _accounts(w, n_ops, li, *acc)[op],
            "ip": w.dc_ips(k, w.botdc24)[sess], "ua": w.mixed_ua(plat, n_ops, 0.5)[op],
            "tz": np.zeros(n, dtype=np.int32), "ad": w.bot_ads(op, ts, 3)}


def _resi_botnet(w: World, n: int, plat: str, li: bool, t0: int | None, acc: Any) -> dict[str, np.ndarray]:
    r = w.rng
    n_nets = max(1, n // 3000)
    net = r.integers(0, n_nets, size=n)
    dev = np.cumsum(r.random(n) < 0.55, dtype=np.int64)  # a device/IP clicks 1-3 times, then the net moves on
    dev -= dev[0]
    k = int(dev[-1]) + 1
    # waves: each net is active a few hours per day
    n_waves = max(1, int(w.days * 3))
    wave_start = w.uniform_times(n_nets * n_waves, t0).reshape(n_nets, n_waves)
    wave = r.integers(0, n_waves, size=n)
    ts = wave_start[net, wave] + (r.exponential(1.0, size=n) * HOUR_MS).astype(np.int64)
    ts = np.minimum(ts, w.end_ms - 1)
    # each wave is a job (a net is rented out by the hour, one buyer's campaigns per job) with target ads of its
    # own; per net, a scenario's two or three nets kept two ads for days (default seed 11: no net moved on the
    # test day, all its clicks on ads it had clicked before, and the ad alone separated it at AUC 0.994)
    job = net * n_waves + wave
    return {"ts": ts, "session": w.ids(k)[dev], "customer": _accounts(w, n_nets, li, *acc)[net],
            "ip": w.residential(k)[dev], "ua": w.ua(plat, k)[dev], "tz": w.tz(k)[dev],
            "ad": w.bot_ads(job, ts, 2, main_ent=net)}


def _compromised(w: World, n: int, plat: str, li: bool, t0: int | None, acc: Any, cust: Customers
                 ) -> dict[str, np.ndarray]:
    r = w.rng
    sizes = r.integers(10, 60, size=n // 10 + 2)
    sizes = _fit(sizes, n)
    k = len(sizes)
    run = np.repeat(np.arange(k), sizes)
    victims = r.choice(len(cust.ids), size=max(1, k // 2))  # each hijacked account is used once or twice
    v_of_run = r.integers(0, len(victims), size=k)
    gaps = np.exp(r.normal(math.log(6000), 0.6, size=n)).astype(np.int64)  # ~6 s apart
    first = np.r_[0, np.cumsum(sizes)[:-1]]
    gaps[first] = 0
    cum = np.cumsum(gaps)
    ts = w.uniform_times(k, t0)[run] + cum - np.repeat(cum[first], sizes)
    ip = np.where(r.random(k) < 0.6, w.dc_ips(k, w.botdc24), w.residential(k))
    return {"ts": ts, "session": w.ids(k)[run], "customer": cust.ids[victims[v_of_run]][run],
            "ip": ip[run], "ua": w.mixed_ua(plat, k, 0.3)[run], "tz": w.tz(k)[run],
            "ad": w.bot_ads(run, ts, 3)}


def _mimic(w: World, n: int, plat: str, li: bool, t0: int | None, acc: Any) -> dict[str, np.ndarray]:
    r, h = w.rng, w.sc["humans"]
    sess, offset, k_arr = _sessions(w, n, h["session_clicks_mean"] + 1, h["gap_median_s"] * 0.8, 0.8)
    k = int(k_arr)
    n_ent = max(1, k // 25)  # each bot runs ~25 sessions over the window
    ent_of_sess = r.integers(0, n_ent, size=k)
    tz = w.tz(n_ent)[ent_of_sess]
    hourly = np.roll(HOURLY[plat], 0 if li else HUMAN_OUT_SHIFT_H)  # the rhythm of the slice's humans
    start, _ = w.times(k, hourly, WEEKLY[plat], tz, t0)
    ent = ent_of_sess[sess]
    ids = w.ids(k)
    ts = start[sess] + offset
    return {"ts": ts, "session": ids[sess], "customer": _accounts(w, n_ent, li, *acc)[ent],
            "ip": w.residential(k)[sess], "ua": w.ua(plat, n_ent)[ent],
            "tz": tz[sess], "ad": w.bot_ads(ent, ts, 6)}


def _night(w: World, n: int, plat: str, li: bool, t0: int | None, acc: Any) -> dict[str, np.ndarray]:
    r = w.rng
    sess, offset, k_arr = _sessions(w, n, 8.0, 20.0, 0.7)
    k = int(k_arr)
    n_ent = max(1, k // 15)
    ent_of_sess = r.integers(0, n_ent, size=k)
    tz = w.tz(n_ent)[ent_of_sess]
    start, _ = w.times(k, NIGHT_HOURLY, np.ones(7), tz, t0)
    ent = ent_of_sess[sess]
    ts = start[sess] + offset
    return {"ts": ts, "session": w.ids(n_ent)[ent], "customer": _accounts(w, n_ent, li, *acc)[ent],
            "ip": w.residential(n_ent)[ent], "ua": w.ua(plat, n_ent)[ent], "tz": tz[sess].astype(np.int32),
            "ad": w.bot_ads(ent, ts, 3)}


def _app_farm(w: World, n: int, plat: str, li: bool, t0: int | None, acc: Any) -> dict[str, np.ndarray]:
    r = w.rng
    n_farms = max(1, n // 5000)
    farm = r.integers(0, n_farms, size=n)
    n_dev = max(1, n // 40)  # devices: ~40 clicks each over the window
    dev = (farm * (n_dev // n_farms + 1) + r.integers(0, n_dev // n_farms + 1, size=n))
    _, dev = np.unique(dev, return_inverse=True)
    k = int(dev.max()) + 1
    farm_ips = w.residential(n_farms * 3).reshape(n_farms, 3)
    ts = w.uniform_times(n, t0)
    # a device keeps the farm's own zone, or was set to the target market's (as the operators do to blend in)
    tz_dev = np.where(r.random(k) < 0.55, FARM_TZ, w.tz(k)).astype(np.int32)
    return {"ts": ts, "session": w.ids(k)[dev], "customer": _accounts(w, n_farms, li, *acc)[farm],
            "ip": farm_ips[farm, r.integers(0, 3, size=n)], "ua": w.ua(plat, k)[dev],
            "tz": tz_dev[dev], "ad": w.bot_ads(farm, ts, 2)}


GENERATORS = {"bursty": _bursty, "low_slow": _low_slow, "dc_rotation": _dc_rotation, "resi_botnet": _resi_botnet,
              "mimic": _mimic, "night": _night, "app_farm": _app_farm}


# ---------------------------------------------------------------------------------------------------------------
# the simulation


def _split(n: int, weights: dict[str, float]) -> dict[str, int]:
    """Split n into integer parts by weight (largest remainder, deterministic order)."""
    keys = list(weights)
    w = np.array([float(weights[k]) for k in keys])
    if n <= 0 or w.sum() <= 0:
        return dict.fromkeys(keys, 0)
    raw = n * w / w.sum()
    base = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - base), kind="stable")[: n - int(base.sum())]:
        base[i] += 1
    return dict(zip(keys, base.tolist(), strict=True))


def _jsonl(objs: Iterable[dict[str, Any]], batch: int = 16_384) -> bytes:
    """Encode objects as JSON lines into one blob.

    Joined batch by batch: orjson 3.13 keeps ~4 KB of capacity behind every bytes object it returns, so a
    million live per-line objects would cost gigabytes (and seconds of page faults).
    """
    parts: list[bytes] = []
    buf: list[bytes] = []
    dumps = orjson.dumps
    for o in objs:
        buf.append(dumps(o))
        if len(buf) == batch:
            parts.append(b"\n".join(buf) + b"\n")
            buf = []
    if buf:
        parts.append(b"\n".join(buf) + b"\n")
    return b"".join(parts)


@dataclass
class Simulation:
    """The simulated dataset in memory: JSON-lines blobs plus column arrays (for tests and benchmarks)."""

    clicks: bytes     # clicks.jsonl content
    purchases: bytes  # purchases.jsonl content
    truth: bytes      # truth.jsonl content
    customers: list[dict[str, Any]]
    ip_ranges: list[dict[str, Any]]
    meta: dict[str, Any]
    ts: np.ndarray
    is_bot: np.ndarray
    archetype: np.ndarray  # int index into ARCHETYPES
    slice_index: np.ndarray  # int index into SLICES

    @property
    def n_clicks(self) -> int:
        return len(self.ts)

    def click_lines(self) -> list[bytes]:
        return self.clicks.splitlines()

    def purchase_lines(self) -> list[bytes]:
        return self.purchases.splitlines()

    def write(self, out: str | Path) -> Path:
        return write_dataset(out, self.clicks, self.purchases, self.customers, self.ip_ranges, self.truth,
                             self.meta)


def simulate(scenario: str | Path | dict[str, Any] = "default", seed: int = 0, *, clicks: int | None = None,
             days: float | None = None) -> Simulation:
    """Simulate a scenario (name, file or dict) with a seed; see the module docstring."""
    sc = load_scenario(scenario, clicks=clicks, days=days)
    w = World(sc, seed)
    r = w.rng
    n_total = int(sc["clicks"])
    per_slice = _split(n_total, {s: sc["slices"][s]["share"] for s in SLICES})

    # customers: enough for the logged-in human volume
    n_li_h = sum(int(per_slice[s] * (1 - sc["slices"][s]["bot_share"])) for s in SLICES if s.endswith(":in"))
    cust = _make_customers(w, max(50, int(n_li_h / sc["humans"]["clicks_per_customer"])))
    cpeople = _people(w, len(cust.ids))
    fake_pool: list[np.ndarray] = []
    fake_rows: list[dict[str, Any]] = []
    acc = (fake_pool, fake_rows)

    drift = sc["drift"]
    drift_t0 = w.start_ms + int(float(drift["day"]) * DAY_MS) if drift else None
    chunks: list[Chunk] = []
    for si, s in enumerate(SLICES):
        plat, side = s.split(":")
        plat_i, li = PLATFORMS.index(plat), side == "in"
        n_s = per_slice[s]
        n_bot = round(n_s * sc["slices"][s]["bot_share"])
        chunks.append(_humans(w, n_s - n_bot, plat_i, li, cust, cpeople,
                              slice_shift=0 if li else HUMAN_OUT_SHIFT_H))
        n_drift = 0
        if drift and s in drift.get("slices", {}) and drift_t0 is not None and drift_t0 < w.end_ms:
            n_drift = int(n_bot * float(drift["slices"][s]) * (w.end_ms - drift_t0) / w.span_ms)
        parts = _split(n_bot - n_drift, sc["archetypes"].get(s, {}))
        for a, n_a in parts.items():
            if n_a <= 0:
                continue
            chunks.append(_bot_chunk(w, a, n_a, plat, li, None, acc, cust, si))
        if n_drift:
            chunks.append(_bot_chunk(w, drift["archetype"], n_drift, plat, li, drift_t0, acc, cust, si))

    # ---- assemble, clip to the window, sort by time (stable: generation order breaks ties) --------------------
    ts = np.concatenate([c.ts for c in chunks])
    keep = (ts >= w.start_ms) & (ts < w.end_ms)
    order = np.argsort(np.where(keep, ts, np.iinfo(np.int64).max), kind="stable")[: int(keep.sum())]
    ts = ts[order]
    cat = {f: np.concatenate([getattr(c, f) for c in chunks])[order]
           for f in ("session", "customer", "ip", "ua", "tz", "ad")}
    plat_col = np.concatenate([np.full(len(c.ts), c.platform, dtype=np.int8) for c in chunks])[order]
    arch_col = np.concatenate([np.full(len(c.ts), c.archetype, dtype=np.int8) for c in chunks])[order]
    li_col = np.array([x is not None for x in cat["customer"].tolist()], dtype=bool)
    n = len(ts)
    is_bot = arch_col > 0
    click_ids = [f"k{seed}-{i:08d}" for i in range(n)]

    # placement and price
    placement = np.empty(n, dtype=object)
    cpc = np.empty(n)
    for pi, p in enumerate(PLATFORMS):
        m = plat_col == pi
        names, probs, mult = PLACEMENTS[p]
        j = r.choice(len(names), size=int(m.sum()), p=probs)
        placement[m] = np.array(names, dtype=object)[j]
        cpc[m] = w.ad_cpc[cat["ad"][m]] * np.array(mult)[j]
    cpc = np.maximum(0.05, np.round(cpc, 2))
    uniq, inv = np.unique(cat["ip"], return_inverse=True)
    ip_str = np.array([f"{x >> 24}.{(x >> 16) & 255}.{(x >> 8) & 255}.{x & 255}" for x in uniq.tolist()],
                      dtype=object)[inv]

    # ---- encode clicks (field order = Click.model_dump, so lines equal Click.to_json()) --------------------------
    plat_names = np.array(PLATFORMS, dtype=object)[plat_col]
    tz_l = [None if t == NO_TZ else t for t in cat["tz"].tolist()]
    click_blob = _jsonl(
        {"v": 1, "click_id": cid, "ts": t, "ip": ip, "session_id": sid, "customer_id": cu, "logged_in": lg,
               "user_agent": ua, "platform": pl, "ad_id": ad, "campaign_id": cmp, "advertiser_id": adv,
               "placement": plc, "cpc": pr, "tz_offset_min": tz}
        for cid, t, ip, sid, cu, lg, ua, pl, ad, cmp, adv, plc, pr, tz in zip(
            click_ids, ts.tolist(), ip_str.tolist(), cat["session"].tolist(), cat["customer"].tolist(),
            li_col.tolist(), cat["ua"].tolist(), plat_names.tolist(), w.ad_ids[cat["ad"]].tolist(),
            w.camp_ids[cat["ad"]].tolist(), w.adv_ids[cat["ad"]].tolist(), placement.tolist(), cpc.tolist(),
            tz_l, strict=True)
    )
    arch_names = np.array(ARCHETYPES, dtype=object)[arch_col].tolist()
    truth_blob = _jsonl({"click_id": c, "is_bot": b, "archetype": a}
                        for c, b, a in zip(click_ids, is_bot.tolist(), arch_names, strict=True))

    # ---- purchases ----------------------------------------------------------------------------------------------
    pc = sc["purchase"]
    rfm_of = dict(zip(cust.ids.tolist(), cust.rfm.tolist(), strict=True))
    rfm = np.array([rfm_of.get(x, 0.0) if x is not None else 0.0 for x in cat["customer"].tolist()])
    p_buy = np.where(li_col, pc["rate"] * (0.3 + pc["rfm_gain"] * rfm), pc["rate"] * pc["anon_factor"])
    p_buy = np.where(is_bot, pc["bot_accident_rate"], p_buy)
    buy = r.random(n) < p_buy
    delay = np.exp(r.normal(math.log(pc["delay_median_min"] * MIN_MS), pc["delay_sigma"], size=n))
    delay = np.clip(delay, MIN_MS, 48 * HOUR_MS).astype(np.int64)
    p_ts = ts + delay
    outages = [(w.start_ms + int(o["day"] * DAY_MS + o["hour"] * HOUR_MS),
                w.start_ms + int(o["day"] * DAY_MS + (o["hour"] + o["hours"]) * HOUR_MS))
               for o in sc["label_outages"]]
    lost = np.zeros(n, dtype=bool)
    for o_start, o_end in outages:
        lost |= (p_ts >= o_start) & (p_ts < o_end)
    sel = np.flatnonzero(buy & ~lost & (p_ts < w.end_ms))
    sel = sel[np.argsort(p_ts[sel], kind="stable")]
    amount = np.round(np.exp(r.normal(3.6, 0.7, size=len(sel))) * (0.6 + rfm[sel]), 2)
    cust_l = cat["customer"].tolist()
    purchase_blob = _jsonl(
        {"v": 1, "purchase_id": f"p{seed}-{j:07d}", "click_id": click_ids[i], "ts": int(p_ts[i]),
         "customer_id": cust_l[i], "amount": float(amt)}
        for j, (i, amt) in enumerate(zip(sel.tolist(), amount.tolist(), strict=True))
    )

    # ---- side files ---------------------------------------------------------------------------------------------
    customers = sorted(cust.rows + fake_rows, key=lambda c: c["customer_id"])
    ip_ranges = [{"prefix": f"{x >> 24}.{(x >> 16) & 255}.{(x >> 8) & 255}.0/24", "datacenter": True}
                 for x in sorted(w.dc24.tolist())]
    slice_idx = (plat_col.astype(np.int8) * 2 + (~li_col).astype(np.int8)).astype(np.int8)
    meta = {
        "source": "simulator", "simulator_version": SIMULATOR_VERSION, "scenario": sc["name"], "seed": seed,
        "start_ms": w.start_ms, "days": sc["days"],
        "end_ms": w.end_ms,
        "counts": {"clicks": n, "purchases": len(sel), "customers": len(customers), "ip_ranges": len(ip_ranges),
                   "truth": n},
        "drift": ({"archetype": drift["archetype"], "day": drift["day"], "start_ms": drift_t0} if drift else None),
        "label_outages": [[a, b] for a, b in outages],
        "bot_share": {s: round(float(is_bot[slice_idx == i].mean()), 4) if (slice_idx == i).any() else 0.0
                      for i, s in enumerate(SLICES)},
        "archetype_counts": {a: int((arch_col == i).sum()) for i, a in enumerate(ARCHETYPES)},
        "bot_purchases": int(is_bot[sel].sum()),
        "config": sc,
    }
    return Simulation(click_blob, purchase_blob, truth_blob, customers, ip_ranges, meta, ts, is_bot,
                      arch_col, slice_idx)


def _bot_chunk(w: World, arch: str, n: int, plat: str, li: bool, t0: int | None, acc: Any, cust: Customers,
               slice_i: int) -> Chunk:
    if arch == "compromised":
        cols = _compromised(w, n, plat, li, t0, acc, cust)
    else:
        cols = GENERATORS[arch](w, n, plat, li, t0, acc)
    # time-zone presence per session, at the archetype's rate (bots.tz_known)
    _, sess = np.unique(cols["session"], return_inverse=True)
    known = w.rng.random(int(sess.max()) + 1 if len(sess) else 0) < float(w.sc["bots"]["tz_known"][arch])
    cols["tz"] = np.where(known[sess], cols["tz"], NO_TZ)
    return Chunk(ts=cols["ts"].astype(np.int64), session=cols["session"], customer=cols["customer"],
                 ip=cols["ip"].astype(np.uint32), ua=cols["ua"], tz=cols["tz"].astype(np.int32),
                 ad=cols["ad"].astype(np.int32), platform=PLATFORMS.index(plat),
                 archetype=ARCHETYPES.index(arch))


def simulate_to(out: str | Path, scenario: str | Path | dict[str, Any] = "default", seed: int = 0, *,
                clicks: int | None = None, days: float | None = None) -> Simulation:
    """Simulate and write the dataset folder ``out``."""
    sim = simulate(scenario, seed, clicks=clicks, days=days)
    sim.write(out)
    return sim
