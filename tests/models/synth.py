"""A tiny synthetic dataset folder for the model tests (the real simulator has its own tests).

Humans browse with a day/night rhythm and sometimes buy; bots never buy: ``burst`` bots click many times
a minute from data-centre IPs, ``steady`` bots click every minute or two for hours, ``hijack`` bots use
low-RFM customer accounts at a human-ish but too regular pace.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.data.dataset import write_dataset
from schemas.events import PLATFORMS

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
DAY_MS = 86_400_000


def make_dataset(out: Path, days: int = 4, seed: int = 0, scale: float = 1.0) -> Path:
    rng = np.random.default_rng(seed)
    clicks: list[dict] = []
    truth: list[dict] = []
    purchases: list[dict] = []
    customers = [{"customer_id": f"u{i}", "rfm_score": float(rng.beta(2, 2)), "recency_days": 3,
                  "frequency": 2, "monetary": 50.0, "account_age_days": int(rng.integers(1, 2000))}
                 for i in range(int(400 * scale))]
    ip_ranges = [{"prefix": f"10.9.{i}.0/24", "datacenter": True} for i in range(4)]

    def add(ts: int, ip: str, sess: str, cust: str | None, plat: str, is_bot: bool, arch: str) -> None:
        cid = f"k{len(clicks)}"
        clicks.append({"click_id": cid, "ts": int(ts), "ip": ip, "session_id": sess, "customer_id": cust,
                       "logged_in": cust is not None, "platform": plat, "ad_id": "a1", "campaign_id": "c1",
                       "advertiser_id": "adv1", "cpc": 0.5})
        truth.append({"click_id": cid, "is_bot": is_bot, "archetype": arch})

    for d in range(days):
        day0 = START_MS + d * DAY_MS
        # humans: sessions of a few clicks, mostly daytime
        for j in range(int(1500 * scale)):
            hour = rng.choice(24, p=_diurnal())
            t = day0 + int(hour * 3_600_000 + rng.integers(0, 3_600_000))
            logged = rng.random() < 0.6
            cust = f"u{rng.integers(0, len(customers))}" if logged else None
            plat = PLATFORMS[rng.integers(0, 3)]
            ip = f"172.16.{rng.integers(0, 50)}.{rng.integers(1, 250)}"
            for _ in range(int(rng.integers(1, 5))):
                add(t, ip, f"h{d}-{j}", cust, plat, False, "human")
                if rng.random() < (0.08 if logged else 0.04):
                    purchases.append({"purchase_id": f"p{len(purchases)}", "click_id": clicks[-1]["click_id"],
                                      "ts": int(t + 60_000), "customer_id": cust, "amount": 20.0})
                t += int(rng.exponential(90_000)) + 5_000
        # burst bots: 30-60 clicks within a few minutes, any hour
        for j in range(int(12 * scale)):
            t = day0 + int(rng.integers(0, DAY_MS - 600_000))
            ip = f"10.9.{rng.integers(0, 4)}.{rng.integers(1, 250)}"
            plat = PLATFORMS[rng.integers(0, 3)]
            for _ in range(int(rng.integers(30, 60))):
                add(t, ip, f"b{d}-{j}", None, plat, True, "burst")
                t += int(rng.integers(500, 6_000))
        # steady bots: one click every 60-120 s for 1-3 hours
        for j in range(int(6 * scale)):
            t = day0 + int(rng.integers(0, DAY_MS - 4 * 3_600_000))
            ip = f"192.168.{rng.integers(0, 200)}.{rng.integers(1, 250)}"
            for _ in range(int(rng.integers(30, 120))):
                add(t, ip, f"s{d}-{j}", None, "desktop", True, "steady")
                t += int(rng.integers(60_000, 120_000))
        # hijacked low-RFM accounts clicking every ~20 s
        low = [c["customer_id"] for c in customers if c["rfm_score"] < 0.3]
        for j in range(int(6 * scale)):
            t = day0 + int(rng.integers(0, DAY_MS - 3_600_000))
            cust = low[int(rng.integers(0, len(low)))]
            ip = f"172.20.{rng.integers(0, 50)}.{rng.integers(1, 250)}"
            for _ in range(int(rng.integers(20, 60))):
                add(t, ip, f"j{d}-{j}", cust, "app", True, "hijack")
                t += int(rng.integers(15_000, 30_000))

    order = sorted(range(len(clicks)), key=lambda i: clicks[i]["ts"])
    clicks = [clicks[i] for i in order]
    truth = [truth[i] for i in order]
    purchases.sort(key=lambda p: p["ts"])
    end = START_MS + days * DAY_MS
    purchases = [p for p in purchases if p["ts"] < end + DAY_MS]
    meta = {"source": "synth", "scenario": "test", "seed": seed, "start_ms": START_MS, "days": days,
            "drift": None, "label_outages": []}
    return write_dataset(out, clicks, purchases, customers, ip_ranges, truth, meta)


def _diurnal() -> np.ndarray:
    h = np.arange(24)
    w = 1.0 + 0.9 * np.sin((h - 8) / 24 * 2 * np.pi)
    return np.asarray(w / w.sum())
