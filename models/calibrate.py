"""Threshold calibration on validation scores: (a) one global threshold, (b) one threshold per slice.

(a) global: the knee of the IVR-FPR curve (Kneedle: farthest point above the chord on normalised axes), or,
    given an FPR budget, the lowest threshold whose FPR stays within it.
(b) slice-level (SLIDR): per slice s, fit IVR_s(f) = a + b f + c f^2 with c <= 0 (concave, non-decreasing
    on the fitted range) by constrained least squares on the slice's achievable (FPR, IVR) points; the lowest
    FPR f_min_s at which the slice still invalidates ``coverage_floor`` of its robotic clicks is a lower
    bound. Then solve

        maximise   sum_s v_s IVR_s(f_s)             (v_s = the slice's share of clicks)
        subject to sum_s p_s f_s <= budget          (p_s = the slice's share of purchasing clicks)
                   f_min_s <= f_s <= f_hi_s

    and map each f_s back to the lowest threshold whose empirical slice FPR is <= f_s. Slices with too few
    purchases to measure an FPR keep the global threshold (lowered if needed to meet the coverage floor);
    slices with too few robotic clicks to measure coverage have no floor.

A per-slice cap (``slice_cap``, ``TrainConfig.slice_fpr_cap`` x the budget) bounds each measured slice's FPR
too (f_hi_s <= max(cap, f_min_s): the coverage floor wins where they conflict). Without it the program spends
the overall budget where IVR is highest, the logged-out slices, at 2-4% FPR there, and true human
false-invalidation there is about twice their purchasers' FPR (their humans are not like their purchasers), so
the overall human false-invalidation came out at 1.4-2.6% for a 1% budget. The global threshold of the
comparison (``global_calibration``) keeps the same cap: raised until no measured slice exceeds it.

Given ``labelled`` (the clicks the weak labels call human: purchases, their sessions, history-consistent RFM;
``TrainingData.labelled_human``), the cap also holds on them in every slice with at least ``min_slice_purchases``
of them: the slice's threshold is at least the lowest whose FPR on its labelled clicks is within the cap. There
are about 7x as many of them as purchasing clicks, so a slice's false invalidations are measured on more than a
handful of purchases. Default scenario seed 11 (feature version 5), validation day, slice mobile:out: 1 of its
179 purchasing clicks invalidated (0.56%, within the cap) but 21 of its 1,166 labelled clicks (1.8%), and 3.9%
of its true humans. The overall budget stays on purchasing clicks (SLIDR's FPR).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from models.metrics import Curve, curve, rates

B = npt.NDArray[np.bool_]


class CalibrationError(ValueError):
    """The requested budget cannot be met; ``slice`` names the binding slice."""

    def __init__(self, message: str, slice_name: str = "") -> None:
        super().__init__(message)
        self.slice = slice_name


def knee(c: Curve) -> int:
    """Index of the knee of the IVR(FPR) curve: max of normalised IVR minus normalised FPR."""
    f, i = c.fpr, c.ivr
    fn = (f - f.min()) / max(float(np.ptp(f)), 1e-12)
    inn = (i - i.min()) / max(float(np.ptp(i)), 1e-12)
    return int(np.argmax(inn - fn))


def lowest_threshold_within(c: Curve, fpr: float) -> int:
    """Index of the lowest threshold whose FPR is <= ``fpr`` (thresholds ascending, FPR descending)."""
    ok = np.flatnonzero(c.fpr <= fpr + 1e-12)
    return int(ok[0]) if len(ok) else len(c.thresholds) - 1


def global_threshold(scores: npt.ArrayLike, purchased: B, heavy: B, budget: float | None,
                     points: int = 400) -> dict[str, Any]:
    """One threshold for every slice: within ``budget`` if given, else at the curve's knee."""
    c = curve(scores, purchased, heavy, points=0 if points == 0 else max(points, 2000))
    k = knee(c)
    i = k if budget is None else lowest_threshold_within(c, budget)
    return {
        "threshold": float(c.thresholds[i]),
        "ivr": float(c.ivr[i]), "fpr": float(c.fpr[i]), "coverage": float(c.coverage[i]),
        "knee": {"threshold": float(c.thresholds[k]), "ivr": float(c.ivr[k]), "fpr": float(c.fpr[k])},
    }


def envelope(c: Curve) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Achievable (FPR, IVR) points: for each distinct FPR the highest IVR reaching it (FPR ascending)."""
    f, i = c.fpr[::-1], c.ivr[::-1]  # FPR ascending
    fu, idx = np.unique(f, return_index=True)
    best = np.maximum.reduceat(i, idx) if len(i) else i
    return fu, best


def fit_concave_quadratic(f: npt.NDArray[np.float64], y: npt.NDArray[np.float64],
                          f_hi: float) -> tuple[float, float, float]:
    """Least squares y ~ a + b f + c f^2 with c <= 0 and slope >= 0 on [0, f_hi] (cvxpy)."""
    import cvxpy as cp

    if len(f) == 1:
        return float(y[0]), 0.0, 0.0
    scale = max(f_hi, 1e-9)  # fit in u = f / f_hi for conditioning
    u = f / scale
    a, b, c = cp.Variable(), cp.Variable(), cp.Variable()
    resid = a + b * u + c * np.square(u) - y
    prob = cp.Problem(cp.Minimize(cp.sum_squares(resid)), [c <= 0, b + 2 * c >= 0, b >= 0])
    prob.solve(solver=cp.CLARABEL)
    if a.value is None or b.value is None or c.value is None:
        raise CalibrationError(f"quadratic fit failed: {prob.status}")
    return float(a.value), float(b.value) / scale, float(c.value) / scale**2


@dataclass
class SliceFit:
    name: str
    v: float  # share of clicks
    p: float  # share of purchasing clicks
    f_min: float  # lowest FPR meeting the coverage floor
    f_hi: float  # upper end of the fitted range
    abc: tuple[float, float, float]
    pinned: bool  # too few purchases: keeps the global threshold
    curve: Curve
    i_cap: int = 0  # the lowest threshold index within the cap on the slice's labelled human clicks


def _floor_fpr(c: Curve, floor: float, min_robotic: int = 1) -> tuple[float, int]:
    """(FPR, index) of the highest threshold whose coverage is still >= floor (no floor: too few robotic)."""
    if c.n_robotic < max(min_robotic, 1):
        return 0.0, len(c.thresholds) - 1
    ok = np.flatnonzero(c.coverage >= floor - 1e-12)
    i = int(ok[-1]) if len(ok) else 0
    return float(c.fpr[i]), i


def _target_index(ft: SliceFit, f: float) -> int:
    """The lowest threshold index of ``ft``'s curve whose FPR is within the program's target ``f`` for the slice,
    and within the cap on its labelled clicks (``ft.i_cap``). A target at its upper bound up to the solver's
    tolerance is read as exactly there: f_hi can be an FPR level of the curve, which 1e-10 below it would miss,
    taking the next, stricter level."""
    f = max(f, ft.f_min)
    if abs(f - ft.f_hi) <= 1e-7:
        f = ft.f_hi
    return max(lowest_threshold_within(ft.curve, f), ft.i_cap)


def slice_calibration(scores: npt.ArrayLike, purchased: B, heavy: B, slices: npt.NDArray[np.str_],
                      budget: float, coverage_floor: float = 0.5, fit_span: float = 4.0,
                      min_slice_purchases: int = 20, points: int = 400,
                      min_slice_robotic: int = 20, slice_cap: float | None = None,
                      labelled: B | None = None) -> dict[str, Any]:
    """Per-slice thresholds maximising volume-weighted IVR within the overall FPR budget and, with
    ``slice_cap``, each measured slice's FPR within it, on its purchasing clicks and (given) on its
    ``labelled`` human clicks (see module doc)."""
    import cvxpy as cp

    s = np.asarray(scores, dtype=np.float64)
    n, n_p = len(s), int(purchased.sum())
    if n_p == 0:
        raise CalibrationError("no purchasing clicks in the calibration data: FPR is undefined")
    g = global_threshold(s, purchased, heavy, budget, points)
    fits: list[SliceFit] = []
    for name in sorted(set(slices.tolist())):
        m = slices == name
        c = curve(s[m], purchased[m], heavy[m], points=points)
        f_min, _ = _floor_fpr(c, coverage_floor, min_slice_robotic)
        pinned = c.n_purchased < min_slice_purchases
        f_hi = min(1.0, max(fit_span * budget, 1.5 * f_min, 1e-6))
        i_cap = 0  # lowest threshold index the cap on labelled clicks allows
        if slice_cap is not None:
            f_hi = min(f_hi, max(slice_cap, f_min, 1e-6))
            if labelled is not None and int(labelled[m].sum()) >= min_slice_purchases:
                c_l = curve(s[m], labelled[m], heavy[m], points=points)  # the same threshold grid (the scores')
                i_cap = lowest_threshold_within(c_l, slice_cap)
                f_hi = min(f_hi, max(float(c.fpr[i_cap]), f_min, 1e-6))
        abc = (0.0, 0.0, 0.0)
        if not pinned:
            fe, ie = envelope(c)
            keep = fe <= f_hi + 1e-12
            abc = fit_concave_quadratic(fe[keep], ie[keep], f_hi)
        fits.append(SliceFit(name, c.n / n, c.n_purchased / n_p, f_min, f_hi, abc, pinned, c, i_cap))

    # pinned slices: the global threshold, lowered to their coverage floor when needed
    thresholds: dict[str, float] = {}
    need_by: dict[str, float] = {}  # each slice's least contribution to the overall FPR
    for ft in fits:
        if ft.pinned:
            _, i_floor = _floor_fpr(ft.curve, coverage_floor, min_slice_robotic)
            t = min(g["threshold"], float(ft.curve.thresholds[i_floor]))
            thresholds[ft.name] = t
            m = slices == ft.name
            need_by[ft.name] = float(((s[m] >= t) & purchased[m]).sum()) / n_p  # = p_s * FPR_s(t)
        else:
            need_by[ft.name] = ft.p * ft.f_min
    free = [ft for ft in fits if not ft.pinned]
    fixed_fpr = sum(need_by[ft.name] for ft in fits if ft.pinned)
    need = sum(need_by.values())
    if need > budget + 1e-12:
        worst = max(fits, key=lambda ft: need_by[ft.name])
        raise CalibrationError(
            f"FPR budget {budget:.4g} is infeasible: the coverage floor ({coverage_floor:.0%} of robotic "
            f"clicks per slice) alone needs an overall FPR of {need:.4g}; the binding slice is {worst.name}, "
            f"which needs {need_by[worst.name]:.4g} of it ({worst.p:.1%} of the purchases, "
            f"{worst.curve.n_robotic} robotic clicks{', few purchases: global threshold' if worst.pinned else ''})",
            worst.name)

    if free:
        f = cp.Variable(len(free))
        obj = 0
        for j, ft in enumerate(free):
            a, b, c2 = ft.abc
            obj = obj + ft.v * (a + b * f[j] + c2 * cp.square(f[j]))
        p = np.array([ft.p for ft in free])
        cons = [p @ f <= budget - fixed_fpr,
                f >= np.array([ft.f_min for ft in free]), f <= np.array([ft.f_hi for ft in free])]
        prob = cp.Problem(cp.Maximize(obj), cons)
        prob.solve(solver=cp.CLARABEL)
        if f.value is None or prob.status not in ("optimal", "optimal_inaccurate"):
            raise CalibrationError(f"slice program not solved: {prob.status}")
        for j, ft in enumerate(free):
            # the slice's floor threshold caps it from above; its FPR target picks the lowest within, and the
            # cap on its labelled clicks from below (purchasers' FPR can be flat where theirs is not)
            i = _target_index(ft, float(f.value[j]))
            _, i_floor = _floor_fpr(ft.curve, coverage_floor, min_slice_robotic)
            thresholds[ft.name] = float(ft.curve.thresholds[min(i, i_floor)])

    # what these thresholds do on the calibration data
    thr = np.array([thresholds[x] for x in slices.tolist()]) if n else np.zeros(0)
    flag = s >= thr
    per_slice = {ft.name: {**rates(flag[slices == ft.name], purchased[slices == ft.name],
                                   heavy[slices == ft.name]),
                           **_labelled_rates(flag[slices == ft.name], None if labelled is None
                                             else labelled[slices == ft.name]),
                           "threshold": thresholds[ft.name], "pinned": ft.pinned,
                           "fpr_floor": ft.f_min, "volume_share": ft.v, "purchase_share": ft.p,
                           "fit_abc": list(ft.abc), "fit_fpr_max": ft.f_hi}
                 for ft in fits}
    return {
        "method": "slice",
        "default_threshold": g["threshold"],
        "thresholds": thresholds,
        "fpr_budget": budget,
        "slice_fpr_cap": slice_cap,
        "coverage_floor": coverage_floor,
        "min_slice_robotic": min_slice_robotic,
        "validation": {"overall": rates(flag, purchased, heavy), "slices": per_slice,
                       "global_at_budget": {k: g[k] for k in ("threshold", "ivr", "fpr", "coverage")},
                       "global_knee": g["knee"]},
    }


def _labelled_rates(flag: B, labelled: B | None) -> dict[str, Any]:
    """The FPR on the clicks the labels call human, and how many there are (none without ``labelled``)."""
    if labelled is None:
        return {}
    r = rates(flag, labelled, np.zeros_like(flag))
    return {"labelled_fpr": r["fpr"], "n_labelled": r["n_purchased"]}


def capped_global(s: npt.NDArray[np.float64], purchased: B, slices: npt.NDArray[np.str_], threshold: float,
                  cap: float, min_slice_purchases: int, points: int = 400, labelled: B | None = None) -> float:
    """``threshold`` raised until no slice with at least ``min_slice_purchases`` purchases (or ``labelled``
    human clicks) has an FPR on them above ``cap``."""
    for name in sorted(set(slices.tolist())):
        m = slices == name
        for ref in (purchased, labelled):
            if ref is None or int(ref[m].sum()) < min_slice_purchases:
                continue
            c = curve(s[m], ref[m], np.zeros(int(m.sum()), dtype=bool), points=max(points, 2000))
            threshold = max(threshold, float(c.thresholds[lowest_threshold_within(c, cap)]))
    return threshold


def global_calibration(scores: npt.ArrayLike, purchased: B, heavy: B, slices: npt.NDArray[np.str_],
                       budget: float | None, coverage_floor: float = 0.5, points: int = 400,
                       slice_cap: float | None = None, min_slice_purchases: int = 20,
                       labelled: B | None = None) -> dict[str, Any]:
    """calibration.json content for one threshold everywhere (knee when ``budget`` is None); with
    ``slice_cap``, raised until no measured slice's FPR exceeds it (module doc)."""
    s = np.asarray(scores, dtype=np.float64)
    g = global_threshold(s, purchased, heavy, budget, points)
    if slice_cap is not None and budget is not None:
        g["threshold"] = capped_global(s, purchased, slices, g["threshold"], slice_cap, min_slice_purchases, points,
                                       labelled)
    flag = s >= g["threshold"]
    names = sorted(set(slices.tolist()))
    return {
        "method": "global",
        "default_threshold": g["threshold"],
        "thresholds": dict.fromkeys(names, g["threshold"]),
        "fpr_budget": budget,
        "slice_fpr_cap": slice_cap,
        "coverage_floor": coverage_floor,
        "validation": {"overall": rates(flag, purchased, heavy),
                       "slices": {x: {**rates(flag[slices == x], purchased[slices == x], heavy[slices == x]),
                                      **_labelled_rates(flag[slices == x], None if labelled is None
                                                        else labelled[slices == x])}
                                  for x in names},
                       "global_knee": g["knee"]},
    }
