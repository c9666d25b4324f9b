"""Realism audit of a simulated dataset: does one observable field alone give an archetype away?

For every bot archetype and every observable field (time zone, user agent, IP kind, IP /24, logged-in,
account age, RFM score, price per click, ad), ``realism_audit`` measures how well the field's value alone
separates the archetype's clicks from human clicks:

- ``auc``: ROC AUC of a score that is a function of the field's value only, P(archetype | value) estimated on
  the other half of the user keys (2-fold cross-fit by a hash of the user key, smoothed towards the base rate,
  unseen values get the base rate). Cross-fitting keeps high-cardinality fields honest: a residential /24 or
  a fresh session that appears once says nothing about another user key, while a shared data-centre range,
  a fixed time zone or a favourite ad does.
- ``ad_next_day``: the same for the ad, fitted on the days before the last and scored on the last (the test
  day): does a lookup table of the bots' ads carry over to the held-out day? (``-`` when the archetype is
  absent before it.)
- ``unseen``: the share of the archetype's clicks on values that no human click (in the same slices) shows.

Humans are those of the archetype's own slices, weighted so that their slice mix is the archetype's (the
platform and logged-in side are known to any model, so a desktop-only user agent does not "separate" an
app-only archetype). Numeric fields (account age, RFM, price) are cut into 20 quantile bins so that
non-monotone giveaways show too; "logged out" (no profile) is a value of its own. A field whose AUC exceeds
``FLAG_AUC`` (0.98) is flagged.

Also ``target_rotation``: the share of the test day's bot clicks on ads that no bot clicked before (in the
training days, and in all earlier days).

``python -m models.data.audit DIR [--json]`` prints the table of a dataset folder; ``slidr simulate --audit``
writes ``audit.json`` into the folder it simulated.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from models.data.dataset import iter_lines

FIELDS = ("tz", "user_agent", "ip_kind", "ip_24", "logged_in", "account_age", "rfm", "cpc", "ad", "ad_next_day")
FLAG_AUC = 0.98
SMOOTH = 20.0  # pseudo-clicks at the base rate added to every value's counts
BINS = 20
DAY_MS = 86_400_000

# first octets of the simulator's address spaces (models.data.simulate): what an IP-intelligence lookup (ASN
# type) would tell a real detector; data-centre ranges listed in ip_ranges.jsonl count as data centre too
_KIND_OCTETS = {"carrier": (172, 174, 166), "office": (12, 63, 65, 192),
                "datacenter": (3, 13, 18, 34, 35, 45, 52, 54, 104, 138, 139, 143, 157, 159, 167, 178)}


def _codes(values: list[Any]) -> npt.NDArray[np.int64]:
    """Integer codes of arbitrary hashable values (None included), in first-seen order."""
    seen: dict[Any, int] = {}
    return np.fromiter((seen.setdefault(v, len(seen)) for v in values), dtype=np.int64, count=len(values))


def _binned(x: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    """Quantile-bin codes of a numeric column; NaN (unknown) is a code of its own (-1)."""
    ok = np.isfinite(x)
    out = np.full(len(x), -1, dtype=np.int64)
    if ok.any():
        edges = np.unique(np.quantile(x[ok], np.linspace(0, 1, BINS + 1)[1:-1]))
        out[ok] = np.searchsorted(edges, x[ok], side="right")
    return out


def load_columns(path: str | Path) -> dict[str, Any]:
    """The audit's columns of a dataset folder (needs truth.jsonl): field codes, slices, truth, days."""
    d = Path(path)
    cust = {c["customer_id"]: c for c in (orjson.loads(x) for x in iter_lines(d / "customers.jsonl"))}
    dc = {r["prefix"].rsplit(".", 1)[0] for r in (orjson.loads(x) for x in iter_lines(d / "ip_ranges.jsonl"))
          if r.get("datacenter")}
    truth = {t["click_id"]: t["archetype"] for t in (orjson.loads(x) for x in iter_lines(d / "truth.jsonl"))}
    meta = orjson.loads((d / "meta.json").read_bytes())
    kind_of = {o: k for k, os_ in _KIND_OCTETS.items() for o in os_}
    cols: dict[str, list[Any]] = {f: [] for f in FIELDS}
    ukey, slc, arch, ts, age, rfm, cpc = [], [], [], [], [], [], []
    for line in iter_lines(d / "clicks.jsonl"):
        c = orjson.loads(line)
        ip24 = c["ip"].rsplit(".", 1)[0]
        cols["tz"].append(c["tz_offset_min"])
        cols["user_agent"].append(c["user_agent"])
        cols["ip_kind"].append("datacenter" if ip24 in dc else kind_of.get(int(ip24.split(".", 1)[0]),
                                                                             "residential"))
        cols["ip_24"].append(ip24)
        cols["logged_in"].append(c["logged_in"])
        cols["ad"].append(c["ad_id"])
        cu = cust.get(c["customer_id"]) if c["customer_id"] else None
        age.append(float(cu["account_age_days"]) if cu else np.nan)
        rfm.append(float(cu["rfm_score"]) if cu else np.nan)
        cpc.append(float(c["cpc"]))
        ukey.append(f"c:{c['customer_id']}" if c["customer_id"] else f"s:{c['session_id']}")
        slc.append(f"{c['platform']}:{'in' if c['logged_in'] else 'out'}")
        arch.append(truth[c["click_id"]])
        ts.append(c["ts"])
    codes = {f: _codes(v) for f, v in cols.items() if f not in ("account_age", "rfm", "cpc")}
    codes["account_age"] = _binned(np.array(age))
    codes["rfm"] = _binned(np.array(rfm))
    codes["cpc"] = _binned(np.array(cpc))
    fold = np.fromiter((zlib.crc32(k.encode()) & 1 for k in ukey), dtype=np.int8, count=len(ukey))
    t = np.array(ts, dtype=np.int64)
    return {"codes": codes, "ad": np.array(cols["ad"], dtype=object), "slice": np.array(slc),
            "archetype": np.array(arch), "fold": fold, "ts": t, "meta": meta,
            "start_ms": int(meta.get("start_ms", int(t.min()) // DAY_MS * DAY_MS))}


def weighted_auc(score: npt.NDArray[np.float64], pos: npt.NDArray[np.bool_],
                 weight: npt.NDArray[np.float64]) -> float:
    """ROC AUC of ``score`` for positives vs negatives with per-row weights (ties count one half)."""
    if not pos.any() or pos.all():
        return float("nan")
    u, inv = np.unique(score, return_inverse=True)
    wp = np.bincount(inv, weights=np.where(pos, weight, 0.0), minlength=len(u))
    wn = np.bincount(inv, weights=np.where(pos, 0.0, weight), minlength=len(u))
    below = np.cumsum(wn) - wn  # negative weight strictly below each score
    return float((wp * (below + 0.5 * wn)).sum() / (wp.sum() * wn.sum()))


def field_separation(code: npt.NDArray[np.int64], pos: npt.NDArray[np.bool_], weight: npt.NDArray[np.float64],
                     fold: npt.NDArray[np.int8]) -> dict[str, float]:
    """Cross-fitted AUC of P(pos | value) and the share of positives on values no negative shows.

    ``fold`` 0/1: each fold is scored from the other; fold -1 rows are fitted on only (never scored), fold 2
    rows scored only (from the -1 rows), for a one-way fit such as earlier days -> test day.
    """
    _, c = np.unique(code, return_inverse=True)
    k = int(c.max()) + 1 if len(c) else 0
    score = np.zeros(len(c))
    one_way = bool((fold == 2).any())
    ev_all = fold == 2 if one_way else fold >= 0
    for f in ((2,) if one_way else (0, 1)):
        fit, ev = (fold == -1, fold == 2) if one_way else (fold != f, fold == f)
        a = np.bincount(c[fit & pos], weights=weight[fit & pos], minlength=k)
        h = np.bincount(c[fit & ~pos], weights=weight[fit & ~pos], minlength=k)
        if a.sum() <= 0 or h.sum() <= 0:
            return {"auc": float("nan"), "unseen": float("nan")}
        base = a.sum() / (a.sum() + h.sum())
        # likelihood ratio against the fold's base rate: an uninformative value scores 1 in both folds
        score[ev] = ((a + SMOOTH * base) / (a + h + SMOOTH) / base)[c[ev]]
    human_vals = np.bincount(c[~pos], minlength=k) > 0
    return {"auc": weighted_auc(score[ev_all], pos[ev_all], weight[ev_all]),
            "unseen": float((~human_vals[c[pos]]).mean())}


def realism_audit(cols: dict[str, Any]) -> dict[str, Any]:
    """Per bot archetype and field: cross-fitted AUC against humans of the same slices, unseen-value share."""
    arch, slc = cols["archetype"], cols["slice"]
    human = arch == "human"
    out: dict[str, Any] = {"fields": list(FIELDS), "flag_auc": FLAG_AUC, "archetypes": {}, "flags": []}
    for a in sorted(set(arch.tolist()) - {"human"}):
        m_a = arch == a
        n_a = int(m_a.sum())
        names, counts = np.unique(slc[m_a], return_counts=True)
        sel = m_a.copy()
        weight = np.ones(len(arch))
        for s, n_s in zip(names.tolist(), counts.tolist(), strict=True):
            hs = human & (slc == s)
            if hs.any():
                sel |= hs
                weight[hs] = (n_s / n_a) / (hs.sum() / max(1, int((human & np.isin(slc, names)).sum())))
        pos = m_a[sel]
        row: dict[str, Any] = {"n": n_a, "slices": {s: int(n) for s, n in zip(names.tolist(), counts.tolist(),
                                                                                strict=True)}, "fields": {}}
        day = (cols["ts"] - cols["start_ms"]) // DAY_MS
        last = int(day.max())
        for f in FIELDS:
            if f == "ad_next_day":  # fitted on the days before the last, scored on the last (the test day)
                fold = np.where(day < last, -1, 2).astype(np.int8)
                r = field_separation(cols["codes"]["ad"][sel], pos, weight[sel], fold[sel])
            else:
                r = field_separation(cols["codes"][f][sel], pos, weight[sel], cols["fold"][sel])
            row["fields"][f] = r
            if np.isfinite(r["auc"]) and r["auc"] > FLAG_AUC:
                out["flags"].append([a, f, round(r["auc"], 4)])
        out["archetypes"][a] = row
    out["target_rotation"] = target_rotation(cols)
    return out


def target_rotation(cols: dict[str, Any]) -> dict[str, Any] | None:
    """Share of the test day's bot clicks on ads no bot clicked before: in the training days, in any earlier day.

    Days as the trainer splits them (``models.labels.time_split``, 1 test day, 1 validation day); None for data
    shorter than 3 days.
    """
    day = (cols["ts"] - cols["start_ms"]) // DAY_MS
    last = int(day.max())
    if last < 2:
        return None
    bot = cols["archetype"] != "human"
    ad = cols["ad"]
    test = bot & (day == last)
    out: dict[str, Any] = {"test_day": last, "test_bot_clicks": int(test.sum())}
    for name, before in (("train_days", last - 1), ("earlier_days", last)):
        seen = set(ad[bot & (day < before)].tolist())
        new = np.fromiter((x not in seen for x in ad[test].tolist()), dtype=bool, count=int(test.sum()))
        out[f"new_vs_{name}"] = float(new.mean()) if len(new) else float("nan")
        out[f"new_ads_vs_{name}"] = len(set(ad[test][new].tolist()))
    out["test_bot_ads"] = len(set(ad[test].tolist()))
    return out


def audit_folder(path: str | Path) -> dict[str, Any]:
    return realism_audit(load_columns(path))


def to_markdown(audit: dict[str, Any]) -> str:
    """One row per archetype: each field's AUC (``!`` above the flag level) and the unseen-value share."""
    fields = audit["fields"]
    lines = ["| archetype | clicks | " + " | ".join(fields) + " |", "|---|---|" + "---|" * len(fields)]
    for a, row in audit["archetypes"].items():
        cells = []
        for f in fields:
            r = row["fields"][f]
            if not np.isfinite(r["auc"]):
                cells.append("-")
                continue
            flag = " !" if r["auc"] > audit["flag_auc"] else ""
            cells.append(f"{r['auc']:.3f}{flag} ({r['unseen']:.2f})")
        lines.append(f"| {a} | {row['n']} | " + " | ".join(cells) + " |")
    tr = audit["target_rotation"]
    lines += ["", f"AUC of P(archetype | field value), cross-fitted over user keys, vs humans of the same slices "
              f"(in brackets: share of the archetype's clicks on values no human shows); ! = above "
              f"{audit['flag_auc']}.",
              f"Flagged: {', '.join(f'{a}/{f} {v:.3f}' for a, f, v in audit['flags']) or 'none'}."]
    if tr is not None:
        lines += [f"Test day {tr['test_day']}: {tr['test_bot_clicks']} bot clicks on {tr['test_bot_ads']} ads; "
                  f"on ads no bot clicked in the training days: {tr['new_vs_train_days']:.3f} "
                  f"({tr['new_ads_vs_train_days']} ads), in any earlier day: {tr['new_vs_earlier_days']:.3f} "
                  f"({tr['new_ads_vs_earlier_days']} ads)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m models.data.audit DATASET_DIR [--json]")
        return 2
    audit = audit_folder(args[0])
    print(orjson.dumps(audit, option=orjson.OPT_INDENT_2).decode() if "--json" in args else to_markdown(audit))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
