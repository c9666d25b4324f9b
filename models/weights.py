"""Sample weights: every (hour of day x day of week x logged-in x label) cell weighs the same.

Without them the loss is dominated by busy daytime hours and logged-in traffic; sparse cells (night hours)
get a model that is barely trained there. Weights have mean 1 and are clipped at ``clip`` times the mean so
that a cell with a handful of rows cannot dominate.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

HOUR_MS = 3_600_000
DAY_MS = 86_400_000


def local_hour_dow(ts_ms: npt.NDArray[np.int64],
                   tz_offset_min: npt.NDArray[np.int64] | None = None) -> tuple[npt.NDArray[np.int64], ...]:
    """Hour of day (0-23) and day of week (0 = Monday) in the visitor's local time when known, else UTC."""
    t = ts_ms if tz_offset_min is None else ts_ms + tz_offset_min.astype(np.int64) * 60_000
    hour = (t // HOUR_MS) % 24
    dow = (t // DAY_MS + 3) % 7  # 1970-01-01 was a Thursday (3 when Monday = 0)
    return hour, dow


def cell_weights(hour: npt.NDArray[np.int64], dow: npt.NDArray[np.int64],
                 logged_in: npt.NDArray[np.bool_], label: npt.NDArray[np.int8],
                 clip: float = 50.0) -> npt.NDArray[np.float32]:
    """Weights giving each non-empty cell the same total weight; mean 1, clipped at ``clip`` x mean."""
    if len(hour) == 0:
        return np.zeros(0, dtype=np.float32)
    cell = ((hour.astype(np.int64) * 7 + dow) * 2 + logged_in.astype(np.int64)) * 2 + label.astype(np.int64)
    _, inv, counts = np.unique(cell, return_inverse=True, return_counts=True)
    w = 1.0 / counts[inv.reshape(-1)]
    w = w / w.mean()
    for _ in range(5):  # clipping moves the mean: a few rounds settle it
        w = np.minimum(w, clip)
        w = w / w.mean()
    return w.astype(np.float32)
