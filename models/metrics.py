"""Detection metrics, pure numpy (no I/O, no torch).

- IVR: invalidation rate, the share of clicks invalidated (``score >= threshold``).
- FPR: the share of *purchasing* clicks invalidated (they were surely human).
- coverage: the share of "robotic" clicks invalidated, a click being robotic when its user key made more than
  k clicks in that clock hour.
- AUC: ROC AUC of the score against the weak label (1 = non-human).
- on simulated data, from the ground truth: bot recall, human false-invalidation rate, and per archetype the
  invalidated share (recall for bot archetypes, false-invalidation for human ones) and a precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

F = npt.NDArray[np.float64]
B = npt.NDArray[np.bool_]

HOUR_MS = 3_600_000


def heavy_mask(user_codes: npt.NDArray[np.int64], ts_ms: npt.NDArray[np.int64], k: int) -> B:
    """True for clicks whose user key made more than ``k`` clicks in the same clock hour."""
    if len(user_codes) == 0:
        return np.zeros(0, dtype=bool)
    hour = ts_ms // HOUR_MS
    pair = np.stack([user_codes.astype(np.int64), hour.astype(np.int64)], axis=1)
    _, inv, counts = np.unique(pair, axis=0, return_inverse=True, return_counts=True)
    return np.asarray(counts[inv.reshape(-1)] > k)


def robotic_mask(user_keys: npt.ArrayLike, ts_ms: npt.ArrayLike, k: int) -> B:
    """``heavy_mask`` from the clicks' user keys (any hashable labels) rather than integer codes."""
    _, codes = np.unique(np.asarray(user_keys), return_inverse=True)
    return heavy_mask(codes.reshape(-1).astype(np.int64), np.asarray(ts_ms, dtype=np.int64), k)


def _rate(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def rates(flag: B, purchased: B, heavy: B) -> dict[str, float]:
    """IVR, FPR and coverage of one set of decisions, with the counts behind them."""
    return {
        "n": int(flag.size),
        "ivr": _rate(flag.sum(), flag.size),
        "fpr": _rate((flag & purchased).sum(), purchased.sum()),
        "coverage": _rate((flag & heavy).sum(), heavy.sum()),
        "n_purchased": int(purchased.sum()),
        "n_robotic": int(heavy.sum()),
    }


def roc_auc(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """ROC AUC (Mann-Whitney with average ranks for ties); NaN when one class is missing."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average rank of each tie group
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def auc_interval(scores: npt.ArrayLike, labels: npt.ArrayLike, n: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``roc_auc``: ``n`` resamples drawn within each class (stratified, so a rare
    class, e.g. TalkingData's ~30 attributed test clicks, is in every resample); NaN when a class is missing."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    lab = np.r_[np.ones(len(pos), dtype=bool), np.zeros(len(neg), dtype=bool)]
    aucs = [roc_auc(s[np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]], lab) for _ in range(n)]
    lo, hi = np.quantile(aucs, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def new_target_mask(ad_ids: npt.ArrayLike, is_bot: B, before: B) -> B:
    """Per row: is its ad one that no bot clicked in the ``before`` rows (e.g. the training days)? The test day's
    bot clicks on such ads measure detection on targets the model never saw attacked (issue 18's unseen ads)."""
    ads = np.asarray(ad_ids)
    seen = np.unique(ads[np.asarray(before, dtype=bool) & np.asarray(is_bot, dtype=bool)])
    return ~np.isin(ads, seen)


def _n_ge(sorted_asc: F, t: F) -> npt.NDArray[np.int64]:
    """How many values of ``sorted_asc`` are >= each threshold in ``t``."""
    return np.asarray(len(sorted_asc) - np.searchsorted(sorted_asc, t, side="left"), dtype=np.int64)


@dataclass(frozen=True)
class Curve:
    """IVR, FPR and coverage as functions of the threshold (thresholds ascending, so rates descending)."""

    thresholds: F
    ivr: F
    fpr: F
    coverage: F
    n: int
    n_purchased: int
    n_robotic: int


def curve(scores: npt.ArrayLike, purchased: B, heavy: B, points: int = 0) -> Curve:
    """The operating curve over a threshold grid: every distinct score (``points=0``) or ``points`` quantiles.

    The grid always contains 1.0 (the strictest threshold a decision can carry), and stops there: scores are
    probabilities, and anything outside [0, 1] (logits) is refused rather than read against a capped grid.
    """
    s = np.asarray(scores, dtype=np.float64)
    if len(s) and (float(np.nanmin(s)) < 0.0 or float(np.nanmax(s)) > 1.0):
        raise ValueError(f"scores must be probabilities in [0, 1], got [{np.nanmin(s):.4g}, {np.nanmax(s):.4g}]: "
                         "pass P(robot) (sigmoid of the logits)")
    grid = np.quantile(s, np.linspace(0.0, 1.0, points)) if points and len(s) > points else s
    t = np.unique(np.concatenate([grid, [1.0]]))
    t = t[t <= 1.0]
    n_all = _n_ge(np.sort(s), t)
    n_p = _n_ge(np.sort(s[purchased]), t)
    n_h = _n_ge(np.sort(s[heavy]), t)
    n, npur, nh = len(s), int(purchased.sum()), int(heavy.sum())
    return Curve(
        thresholds=t,
        ivr=n_all / max(n, 1),
        fpr=n_p / npur if npur else np.zeros(len(t)),
        coverage=n_h / nh if nh else np.ones(len(t)),
        n=n,
        n_purchased=npur,
        n_robotic=nh,
    )


def threshold_at_fpr(scores: npt.ArrayLike, purchased: B, budget: float) -> float:
    """The lowest threshold (so the highest IVR) whose FPR is at most ``budget``."""
    c = curve(scores, purchased, np.zeros(len(purchased), dtype=bool))
    ok = np.flatnonzero(c.fpr <= budget + 1e-12)
    return float(c.thresholds[ok[0]]) if len(ok) else 1.0


def ivr_at_fpr(scores: npt.ArrayLike, purchased: B, budget: float) -> float:
    """The highest IVR a single threshold reaches with FPR at most ``budget``."""
    s = np.asarray(scores, dtype=np.float64)
    return float((s >= threshold_at_fpr(s, purchased, budget)).mean()) if len(s) else float("nan")


def row_thresholds(slices: npt.NDArray[np.str_], thresholds: dict[str, float], default: float) -> F:
    """Each row's threshold from its slice (``default`` for slices without their own)."""
    out = np.full(len(slices), default, dtype=np.float64)
    for s, t in thresholds.items():
        out[slices == s] = t
    return out


def truth_metrics(flag: B, is_bot: B, archetype: npt.NDArray[np.str_]) -> dict[str, Any]:
    """Bot recall, human false-invalidation rate and precision; per archetype its invalidated share.

    Per archetype ``precision`` is, for a bot archetype a, flagged_a / (flagged_a + flagged humans): the
    precision we would see if a were the only kind of bot.
    """
    fh = float((flag & ~is_bot).sum())
    out: dict[str, Any] = {
        "bot_recall": _rate((flag & is_bot).sum(), is_bot.sum()),
        "human_false_invalidation": _rate(fh, (~is_bot).sum()),
        "precision": _rate((flag & is_bot).sum(), flag.sum()),
        "n_bots": int(is_bot.sum()),
        "n_humans": int((~is_bot).sum()),
        "archetypes": {},
    }
    for a in np.unique(archetype):
        m = archetype == a
        bot = bool(is_bot[m].any())
        fa = float((flag & m).sum())
        out["archetypes"][str(a)] = {
            "n": int(m.sum()),
            "is_bot": bot,
            "invalidated": _rate(fa, m.sum()),
            "precision": _rate(fa, fa + fh) if bot else float("nan"),
        }
    return out


def recall_at_fir(scores: npt.ArrayLike, is_bot: B, archetype: npt.NDArray[np.str_],
                  fir: float = 0.01) -> dict[str, Any]:
    """Truth metrics at the lowest single threshold whose human false-invalidation rate is <= ``fir``."""
    s = np.asarray(scores, dtype=np.float64)
    t = threshold_at_fpr(s, ~is_bot, fir)  # "purchased" = humans here: same computation
    return {"threshold": t, "fir_target": fir, **truth_metrics(s >= t, is_bot, archetype)}


def evaluate(scores: npt.ArrayLike, thr: F, purchased: B, heavy: B, slices: npt.NDArray[np.str_],
             label: npt.ArrayLike, truth: tuple[B, npt.NDArray[np.str_]] | None = None) -> dict[str, Any]:
    """Overall and per-slice IVR, FPR, coverage, AUC (and truth metrics) of per-row thresholds ``thr``."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(label).astype(bool)
    flag = s >= thr

    def block(m: B) -> dict[str, Any]:
        d: dict[str, Any] = {**rates(flag[m], purchased[m], heavy[m]), "auc": roc_auc(s[m], y[m])}
        if truth is not None:
            t = truth_metrics(flag[m], truth[0][m], truth[1][m])
            d |= {k: t[k] for k in ("bot_recall", "human_false_invalidation", "precision")}
        return d

    out: dict[str, Any] = {"overall": block(np.ones(len(s), dtype=bool)), "slices": {}}
    for sl in sorted(set(slices.tolist())):
        out["slices"][sl] = block(slices == sl)
    if truth is not None:
        out["truth"] = truth_metrics(flag, truth[0], truth[1])
    return out
