"""Weak labels and the time-based split (pure numpy).

SLIDR's weak supervision: a click is human (label 0) when it led to a purchase or its customer's RFM score is
high; everything else is "non-human" (label 1). The model's target is P(label = 1) = P(robot). Beside SLIDR's rule,
a purchase also vouches for the clicks of its own session around it (:func:`purchase_sessions`).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from models.config import TrainConfig

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "val", "test")


def weak_labels(purchased: npt.NDArray[np.bool_], rfm: npt.NDArray[np.float64],
                rfm_threshold: float, robotic: npt.NDArray[np.bool_] | None = None,
                consistent: npt.NDArray[np.bool_] | None = None) -> npt.NDArray[np.int8]:
    """1 = non-human, 0 = human (purchase, or RFM score >= threshold). ``rfm`` is NaN when logged out.

    ``robotic`` (optional): clicks of the "surely robotic" heuristic set (more than k clicks in an hour). A
    high RFM score does not make those human: a good customer's account clicking like a machine is a taken-over
    account, and labelling it human would teach the model that bursts on logged-in accounts are human. Only a
    purchase still does.

    ``consistent`` (optional, :func:`consistent_with_history`): a high RFM score makes a click human only when the
    click also looks like its account's own earlier sessions (a user agent or IP range it used before): a hijacked
    account keeps its owner's RFM score but not the owner's device or network. SLIDR's rule is without it.
    """
    high_rfm = _high_rfm(rfm, rfm_threshold, robotic)
    if consistent is not None:
        high_rfm &= consistent
    return np.where(purchased | high_rfm, 0, 1).astype(np.int8)


def _high_rfm(rfm: npt.NDArray[np.float64], rfm_threshold: float,
              robotic: npt.NDArray[np.bool_] | None) -> npt.NDArray[np.bool_]:
    """A high RFM score outside the robotic set: what lets a click without a purchase be called human."""
    high = np.nan_to_num(rfm, nan=-1.0) >= rfm_threshold
    return high & ~robotic if robotic is not None else high


def training_labels(purchased: npt.NDArray[np.bool_], rfm: npt.NDArray[np.float64], rfm_threshold: float,
                    robotic: npt.NDArray[np.bool_] | None, consistent: npt.NDArray[np.bool_] | None,
                    first_session: npt.NDArray[np.bool_] | None, needs_history: bool,
                    purchase_session: npt.NDArray[np.bool_] | None = None
                    ) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.bool_] | None]:
    """The weak labels a trainer uses and the rows that weigh nothing (``TrainingData.unverified``): with the
    account-history check (``needs_history``, ``TrainConfig.rfm_needs_history``: ``consistent`` and
    ``first_session`` required) or SLIDR's rule (no such rows).

    ``purchase_session`` (optional, :func:`purchase_sessions`): clicks a purchase in their own session vouches for;
    they are human too (and weigh as such), except those in the robotic set (``robotic``), where only a click's own
    purchase makes it human."""
    if not needs_history:
        label, unverified = weak_labels(purchased, rfm, rfm_threshold, robotic), None
    elif consistent is None or first_session is None:
        raise ValueError("rfm_needs_history labels need each click's account-history check (session, user agent, "
                         "IP): pass consistent= and first_session=, or set rfm_needs_history=false for SLIDR's rule")
    else:
        label = weak_labels(purchased, rfm, rfm_threshold, robotic, consistent)
        unverified = unverified_rfm(purchased, rfm, rfm_threshold, robotic, first_session)
    if purchase_session is not None:
        vouched = purchase_session & ~robotic if robotic is not None else purchase_session
        label = np.where(vouched, 0, label).astype(np.int8)
        if unverified is not None:
            unverified = unverified & ~vouched
    return label, unverified


def config_labels(cfg: TrainConfig, purchased: npt.NDArray[np.bool_], rfm: npt.NDArray[np.float64],
                  heavy: npt.NDArray[np.bool_], ts: npt.NDArray[np.int64], user_keys: Sequence[str],
                  sessions: Sequence[str], consistent: npt.NDArray[np.bool_] | None
                  ) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.bool_] | None]:
    """:func:`training_labels` under a trainer's config, from the clicks (arrival order): the robotic set ``heavy``
    when ``robotic_overrides_rfm``, the account-history check (``consistent``, :func:`consistent_with_history`;
    needed when ``rfm_needs_history``) and the purchase sessions within ``purchase_session_h``. The one place both
    training paths (a dataset folder, ``models.train``; the stream's window, ``models.retrain``) build labels."""
    return training_labels(purchased, rfm, cfg.rfm_threshold, heavy if cfg.robotic_overrides_rfm else None,
                           consistent, first_account_sessions(user_keys, sessions), cfg.rfm_needs_history,
                           purchase_sessions(sessions, ts, purchased, round(cfg.purchase_session_h * HOUR_MS)))


def purchase_sessions(sessions: Sequence[str], ts: npt.NDArray[np.int64], purchased: npt.NDArray[np.bool_],
                      within_ms: int) -> npt.NDArray[np.bool_]:
    """Per click: is it within ``within_ms`` (before or after) of a click of its own session that led to a purchase
    (that click included)? All False when ``within_ms`` <= 0 (a purchase then vouches only for its own click).

    A purchase shows that a person was behind the session, not only behind the one click it is attributed to:
    the clicks that led there are that person's too. SLIDR's rule labels only the purchasing click, so a
    non-buying human's clicks and a buying human's other clicks are all "non-human", and a model learns "does not
    buy" instead of "is not human". The window bounds what one purchase can vouch for: a session id that lives for
    days (a bot's cookie; a bot that bought once) is vouched for only around its purchase. Labels may look ahead
    (a purchase comes after its clicks anyway), so this is for training and evaluation, not for scoring.
    """
    n = len(sessions)
    out = np.zeros(n, dtype=bool)
    if within_ms <= 0 or not purchased.any():
        return out
    buys: dict[str, list[int]] = {}
    for i in np.flatnonzero(purchased).tolist():
        buys.setdefault(sessions[i], []).append(int(ts[i]))
    for v in buys.values():
        v.sort()
    for i, (s, t) in enumerate(zip(sessions, np.asarray(ts).tolist(), strict=True)):
        b = buys.get(s)
        if b is not None:
            j = bisect_left(b, t - within_ms)
            out[i] = j < len(b) and b[j] <= t + within_ms
    return out


def consistent_with_history(user_keys: Sequence[str], sessions: Sequence[str], user_agents: Sequence[str],
                            ip24s: Sequence[str]) -> npt.NDArray[np.bool_]:
    """Per click (arrival order): does it look like its logged-in account's own earlier sessions? True when its
    user agent or its IP /24 is one the account (user key ``c:...``) used in an earlier session, and for the
    account's first session in the data (nothing to contradict it; :func:`unverified_rfm` marks those clicks so
    that training gives them no weight); False for logged-out keys (no account; their RFM score is unknown anyway).

    Causal (only earlier sessions count, never the click's own session, so a hijacker's run does not vouch for
    itself once the account has a history): the account-history check of :func:`weak_labels`' ``consistent``
    argument. A taken-over account is driven from the attacker's proxy with the attacker's client, so it rarely
    shows the owner's device or range.
    """
    out = np.zeros(len(user_keys), dtype=bool)
    hist: dict[str, tuple[set[str], set[str]]] = {}
    cur: dict[str, tuple[str, set[str], set[str]]] = {}  # the account's current session: id, its UAs, /24s
    for i, (k, s, ua, p) in enumerate(zip(user_keys, sessions, user_agents, ip24s, strict=True)):
        if not k.startswith("c:"):
            continue
        c = cur.get(k)
        if c is None or c[0] != s:
            if c is not None:  # the previous session becomes history
                past = hist.setdefault(k, (set(), set()))
                past[0].update(c[1])
                past[1].update(c[2])
            c = cur[k] = (s, set(), set())
        h = hist.get(k)
        out[i] = h is None or ua in h[0] or p in h[1]
        c[1].add(ua)
        c[2].add(p)
    return out


def first_account_sessions(user_keys: Sequence[str], sessions: Sequence[str]) -> npt.NDArray[np.bool_]:
    """Per click (arrival order): is it in its logged-in account's first session in the data? There the account
    has no history to check a high RFM score against (:func:`consistent_with_history` then lets it stand)."""
    out = np.zeros(len(user_keys), dtype=bool)
    first: dict[str, str] = {}
    for i, (k, s) in enumerate(zip(user_keys, sessions, strict=True)):
        if k.startswith("c:"):
            out[i] = first.setdefault(k, s) == s
    return out


def unverified_rfm(purchased: npt.NDArray[np.bool_], rfm: npt.NDArray[np.float64], rfm_threshold: float,
                   robotic: npt.NDArray[np.bool_] | None, first_session: npt.NDArray[np.bool_]
                   ) -> npt.NDArray[np.bool_]:
    """Clicks called human only by a high RFM score in their account's first session in the data, where the
    account-history check has nothing to compare with: with ``rfm_needs_history`` they weigh nothing in training
    and validation (``models.train.sample_weights``), neither human nor robotic. Calling them human let a hijack
    that is the account's first session in the data vouch for itself; calling them robotic made the labels depend
    on the window's age (one-day small scenario: LightGBM's weak-label test AUC 0.40, the MLP below logistic
    regression)."""
    return _high_rfm(rfm, rfm_threshold, robotic) & first_session & ~purchased


def time_split(ts_ms: npt.NDArray[np.int64], start_ms: int | None = None, test_days: int = 1,
               val_days: int = 1, val_frac: float = 0.2, test_frac: float = 0.2,
               labelled: npt.NDArray[np.bool_] | None = None) -> npt.NDArray[np.int8]:
    """TRAIN / VAL / TEST per row by time: never random across time.

    With at least ``test_days + val_days + 1`` days since ``start_ms`` (default: the first click's UTC
    midnight), the last ``test_days`` whole days are the test set and the ``val_days`` before them
    validation. Shorter data (e.g. one simulated day) is cut by time instead: the last ``test_frac`` of the
    time span is the test set, the ``val_frac`` before it validation.

    ``labelled`` (optional): the rows that will be used (``mature_labels``); the layout (last day, time span) is
    taken from them, so unlabelled clicks at the end do not leave a split empty. Every row still gets a split.
    """
    if len(ts_ms) == 0:
        return np.zeros(0, dtype=np.int8)
    start = int(start_ms) if start_ms is not None else int(ts_ms.min()) // DAY_MS * DAY_MS
    day = (ts_ms - start) // DAY_MS
    span = ts_ms if labelled is None or not labelled.any() else ts_ms[labelled]
    last = int(span.max() - start) // DAY_MS
    out = np.full(len(ts_ms), TRAIN, dtype=np.int8)
    if last + 1 >= test_days + val_days + 1:
        out[day > last - test_days - val_days] = VAL
        out[day > last - test_days] = TEST
        return out
    lo, hi = int(span.min()), int(span.max()) + 1
    t_test = hi - test_frac * (hi - lo)
    t_val = t_test - val_frac * (hi - lo)
    out[ts_ms >= t_val] = VAL
    out[ts_ms >= t_test] = TEST
    return out


def label_audit(label: npt.NDArray[np.int8], is_bot: npt.NDArray[np.bool_],
                archetype: npt.NDArray[np.str_]) -> dict[str, Any]:
    """The weak labels against the simulator's truth (evaluation only: the truth never enters training).

    Per archetype the share of its clicks the weak labels call human (label 0); overall the weak labels'
    precision and recall for humans (of the clicks labelled human, the truly human share; of the human clicks,
    the share labelled human) and the share of bot clicks labelled human.
    """
    called = label == 0
    human = ~is_bot
    n_called, n_human = int(called.sum()), int(human.sum())
    tp = int((called & human).sum())
    return {
        "n": len(label),
        "human_precision": tp / n_called if n_called else float("nan"),
        "human_recall": tp / n_human if n_human else float("nan"),
        "bots_called_human": float(called[is_bot].mean()) if is_bot.any() else float("nan"),
        "archetypes": {str(a): {"n": int((archetype == a).sum()),
                                "called_human": float(called[archetype == a].mean())}
                       for a in np.unique(archetype)},
    }


# ---- label maturity: a click's weak label is final only once its attribution window has closed ------------------


def purchase_delays(click_ts: npt.NDArray[np.int64], click_ids: list[str], purchase_click_ids: list[str],
                    purchase_ts: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Click-to-purchase delay (ms) of every purchase whose click is among ``click_ids``."""
    at = {c: i for i, c in enumerate(click_ids)}
    pairs = [(int(t), at[c]) for c, t in zip(purchase_click_ids, np.asarray(purchase_ts).tolist(), strict=True)
             if c in at]
    if not pairs:
        return np.zeros(0, dtype=np.int64)
    p_ts, ci = np.array(pairs, dtype=np.int64).T
    return np.asarray(p_ts - np.asarray(click_ts, dtype=np.int64)[ci], dtype=np.int64)


def measure_attribution_window(ds: Any, q: float = 0.99) -> dict[str, Any]:
    """The ``q`` quantile of a dataset's click-to-purchase delays (``models.data.dataset.Dataset``), in hours,
    with a few other quantiles: to check ``TrainConfig.attribution_window_h`` against one's own data.

    Delays are right-censored by the data's end and by label outages (purchases after them are not there), so
    the figure is a lower bound, close when the data spans many windows.
    """
    d = purchase_delays(np.asarray(ds.ts, dtype=np.int64), [c.click_id for c in ds.clicks],
                        [p.click_id for p in ds.purchases], np.array([p.ts for p in ds.purchases], dtype=np.int64))
    quant = {f"p{round(x * 100, 1):g}": float(np.quantile(d, x)) / HOUR_MS if len(d) else float("nan")
             for x in (0.5, 0.9, 0.95, 0.99, 0.999)}
    return {"purchases": len(d), "q": q, "window_h": float(np.quantile(d, q)) / HOUR_MS if len(d) else float("nan"),
            "quantiles_h": quant}


def labels_end_ms(meta: dict[str, Any], click_ts: npt.NDArray[np.int64],
                  purchase_ts: npt.NDArray[np.int64]) -> int:
    """Until when purchases were collected: ``meta['end_ms']`` when the dataset says so, else just after its last
    event (click or purchase)."""
    if meta.get("end_ms") is not None:
        return int(meta["end_ms"])
    last = int(np.max(click_ts)) if len(click_ts) else 0
    if len(purchase_ts):
        last = max(last, int(np.max(purchase_ts)))
    return last + 1


def mature_labels(ts_ms: npt.NDArray[np.int64], window_ms: int, end_ms: int,
                  outages: Sequence[tuple[int, int]] = ()) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Which clicks have a final weak label: their attribution window ``[ts, ts + window_ms)`` closed by ``end_ms``
    (``young`` otherwise) and overlaps no purchase-label outage ``[start_ms, end_ms)`` (``in_outage`` otherwise:
    purchases made during an outage are lost, so a click shortly before one is labelled robotic for lack of them).

    Returns ``(young, in_outage)``; a click is labelled when neither is set.
    """
    ts = np.asarray(ts_ms, dtype=np.int64)
    close = ts + max(int(window_ms), 1)  # the window [ts, close) holds at least the click's own instant
    young = close > int(end_ms)
    in_outage = np.zeros(len(ts), dtype=bool)
    for a, b in outages:
        in_outage |= (ts < int(b)) & (close > int(a))
    return young, in_outage
