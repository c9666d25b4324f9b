"""Small deterministic click generators for tests and benchmarks (the full simulator is models/data/simulate.py)."""

from __future__ import annotations

import random

from schemas.events import Click

T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z, a Tuesday


def click(i: int, ts: int, *, ip: str = "10.0.0.1", session: str = "s1", customer: str | None = None,
          platform: str = "desktop", tz: int | None = None, advertiser: str = "adv1", cpc: float = 0.5,
          ad: str = "ad1", ua: str = "", placement: str = "") -> Click:
    return Click(click_id=f"c{i}", ts=ts, ip=ip, session_id=session, customer_id=customer,
                 logged_in=customer is not None, platform=platform, ad_id=ad, campaign_id="cmp1",  # type: ignore[arg-type]
                 advertiser_id=advertiser, cpc=cpc, tz_offset_min=tz, user_agent=ua,
                 placement=placement)


def traffic(n: int, seed: int = 0, *, users: int = 300, ips: int = 60, rate_ms: int = 50,
            late_frac: float = 0.02) -> list[Click]:
    """``n`` clicks in arrival order: a mix of humans, a few fast bots and shared gateway IPs, some late."""
    rnd = random.Random(seed)
    out: list[Click] = []
    ts = T0
    for i in range(n):
        ts += rnd.randint(0, 2 * rate_ms)
        u = rnd.randint(0, users - 1) if rnd.random() > 0.2 else rnd.randint(0, 3)  # users 0..3 are hot bots
        logged = u % 2 == 0
        ev = ts - rnd.randint(0, 120_000) if rnd.random() < late_frac else ts
        out.append(click(
            i, ev, ip=f"10.{u % 7}.{rnd.randint(0, 1)}.{(u * 7 + rnd.randint(0, 1)) % ips}",
            session=f"sess{u}-{rnd.randint(0, 2)}", customer=f"cust{u}" if logged else None,
            platform=("desktop", "mobile", "app")[u % 3], tz=(-300 if u % 5 == 0 else None),
            advertiser=f"adv{u % 4}", cpc=round(0.1 + (u % 10) / 10, 2),
            ad=f"ad{(u * 3 + i // 50) % 12}", ua=f"ua{u % 5}",  # (derived: the random draws stay as they were)
        ))
    return out
