"""Weak labels and the time-based split (pure numpy).

SLIDR's weak supervision: a click is human (label 0) when it led to a purchase or its customer's RFM score is
high; everything else is "non-human" (label 1). The model's target is P(label = 1) = P(robot).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

DAY_MS = 86_400_000
TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "val", "test")


def weak_labels(purchased: npt.NDArray[np.bool_], rfm: npt.NDArray[np.float64],
                rfm_threshold: float, robotic: npt.NDArray[np.bool_] | None = None) -> npt.NDArray[np.int8]:
    """1 = non-human, 0 = human (purchase, or RFM score >= threshold). ``rfm`` is NaN when logged out.

    ``robotic`` (optional): clicks of the "surely robotic" heuristic set (more than k clicks in an hour). A
    high RFM score does not make those human: a good customer's account clicking like a machine is a taken-over
    account, and labelling it human would teach the model that bursts on logged-in accounts are human. Only a
    purchase still does.
    """
    high_rfm = np.nan_to_num(rfm, nan=-1.0) >= rfm_threshold
    if robotic is not None:
        high_rfm &= ~robotic
    return np.where(purchased | high_rfm, 0, 1).astype(np.int8)


def time_split(ts_ms: npt.NDArray[np.int64], start_ms: int | None = None, test_days: int = 1,
               val_days: int = 1, val_frac: float = 0.2, test_frac: float = 0.2) -> npt.NDArray[np.int8]:
    """TRAIN / VAL / TEST per row by time: never random across time.

    With at least ``test_days + val_days + 1`` days since ``start_ms`` (default: the first click's UTC
    midnight), the last ``test_days`` whole days are the test set and the ``val_days`` before them
    validation. Shorter data (e.g. one simulated day) is cut by time instead: the last ``test_frac`` of the
    time span is the test set, the ``val_frac`` before it validation.
    """
    if len(ts_ms) == 0:
        return np.zeros(0, dtype=np.int8)
    start = int(start_ms) if start_ms is not None else int(ts_ms.min()) // DAY_MS * DAY_MS
    day = (ts_ms - start) // DAY_MS
    last = int(day.max())
    out = np.full(len(ts_ms), TRAIN, dtype=np.int8)
    if last + 1 >= test_days + val_days + 1:
        out[day > last - test_days - val_days] = VAL
        out[day > last - test_days] = TEST
        return out
    lo, hi = int(ts_ms.min()), int(ts_ms.max()) + 1
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
