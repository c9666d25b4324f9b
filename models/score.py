"""``slidr score MODEL DIR --out FILE``: apply a model to a dataset folder, labelled or not.

The clicks are featurized in event-time (= arrival) order by the stream's own functions
(``stream.features.featurize``, with the profile cache content ``slidr cache load`` would write from the same
folder), scored by the stream's scorer (``stream.scoring.load_model`` / ``score_batch``) and decided by its
thresholds (``decision_dicts``): a click gets the score and decision a worker that had seen exactly these
clicks would publish. Output, one row per click in that order (CSV or Parquet, by the file's suffix):

``click_id, ts, user_key, ip, slice, score, threshold, valid, purchased, robotic``

(``purchased``: a purchase in the folder is attributed to the click; ``robotic``: its user key made more than
``coverage_k`` clicks in that clock hour). The summary gives per slice the IVR, and the FPR only where the
slice has purchases, the robotic coverage only where it has robotic clicks (None otherwise).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from models.metrics import rates, robotic_mask, truth_metrics

COLUMNS = ("click_id", "ts", "user_key", "ip", "slice", "score", "threshold", "valid", "reason", "purchased",
           "robotic")
BATCH = 4096  # rows per onnxruntime call


def model_folder(path: Path) -> Path:
    """A model folder, or the active model of a registry folder (one with an ``ACTIVE`` file)."""
    from stream.scoring import active_model_dir

    return active_model_dir(path) if (path / "ACTIVE").exists() else path


def _rates(flag: np.ndarray, purchased: np.ndarray, robotic: np.ndarray) -> dict[str, Any]:
    r: dict[str, Any] = rates(flag, purchased, robotic)
    if not r["n_purchased"]:
        r["fpr"] = None
    if not r["n_robotic"]:
        r["coverage"] = None
    return r


def score_dataset(model_path: Path, data_dir: Path, out: Path | None = None, *, coverage_k: int | None = None,
                  providers: str = "CPUExecutionProvider") -> dict[str, Any]:
    """Score every click of ``data_dir``; write the rows to ``out`` (``.csv`` / ``.parquet``) when given.

    Returns the summary: ``model_version``, ``clicks``, ``overall`` and ``slices`` (rates), and on simulated
    data ``true_bot_recall`` / ``true_human_false_invalidation``."""
    from models.data.dataset import load_dataset
    from stream.cache import profiles_from_dir
    from stream.features import featurize
    from stream.scoring import decision_dicts, load_model, score_batch

    if out is not None and out.suffix.lower() not in (".csv", ".parquet"):
        raise ValueError(f"{out}: the output is .csv or .parquet")
    model = load_model(model_folder(model_path), providers)
    k = coverage_k or int(model.manifest.get("config", {}).get("coverage_k") or 30)
    ds = load_dataset(data_dir)
    clicks = ds.clicks
    x = featurize(clicks, profiles_from_dir(data_dir))
    scores = np.concatenate([score_batch(model, x[i:i + BATCH]) for i in range(0, len(x), BATCH)]) \
        if len(x) else np.zeros(0, dtype=np.float32)
    decided_at = int(time.time() * 1000)
    dec = [d for i in range(0, len(x), BATCH) for d in decision_dicts(  # reason codes per batch, as the worker
        model, clicks[i:i + BATCH], scores[i:i + BATCH], decided_at=decided_at, features=x[i:i + BATCH])]
    flag = np.fromiter((not d["valid"] for d in dec), dtype=bool, count=len(dec))
    purchased = ds.purchased
    robotic = robotic_mask([c.user_key for c in clicks], ds.ts, k) if clicks else np.zeros(0, dtype=bool)
    slices = np.array([d["slice"] for d in dec], dtype=str)
    summary: dict[str, Any] = {"model_version": model.version, "provider": model.provider, "data_dir": str(data_dir),
                               "clicks": len(clicks), "coverage_k": k, "has_purchases": bool(purchased.any()),
                               "overall": _rates(flag, purchased, robotic), "slices": {}}
    for sl in sorted(set(slices.tolist())):
        m = slices == sl
        summary["slices"][sl] = _rates(flag[m], purchased[m], robotic[m])
    if ds.is_bot is not None and ds.archetypes is not None:
        arch = np.array(ds.archetypes)
        tm = truth_metrics(flag, ds.is_bot, arch)
        summary["true_bot_recall"] = tm["bot_recall"]
        summary["true_human_false_invalidation"] = tm["human_false_invalidation"]
        for sl in summary["slices"]:
            m = slices == sl
            summary["slices"][sl]["true_bot_recall"] = truth_metrics(flag[m], ds.is_bot[m], arch[m])["bot_recall"]
    if out is not None:
        cols: dict[str, list[Any]] = {
            "click_id": [c.click_id for c in clicks], "ts": [c.ts for c in clicks],
            "user_key": [c.user_key for c in clicks], "ip": [c.ip for c in clicks], "slice": slices.tolist(),
            "score": [d["score"] for d in dec], "threshold": [d["threshold"] for d in dec],
            "valid": [d["valid"] for d in dec], "reason": [d["reason"] for d in dec],
            "purchased": purchased.tolist(), "robotic": robotic.tolist()}
        write_rows(out, cols)
        summary["out"] = str(out)
    return summary


def write_rows(out: Path, cols: dict[str, list[Any]]) -> None:
    """Columns (``COLUMNS`` order) to a Parquet file or a CSV file with a header (booleans as true/false)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({c: cols[c] for c in COLUMNS}), tmp)
    else:
        import csv

        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS)
            for row in zip(*(cols[c] for c in COLUMNS), strict=True):
                w.writerow(["true" if v is True else "false" if v is False else v for v in row])
    tmp.replace(out)


def print_summary(s: dict[str, Any]) -> None:
    """The per-slice table (IVR; FPR and coverage where defined, '-' elsewhere)."""
    from rich.console import Console
    from rich.table import Table

    tab = Table(title=f"{s['clicks']:,} clicks scored by {s['model_version']}")
    has_truth = "true_bot_recall" in s
    for col in ("slice", "clicks", "IVR", "FPR", "purchased", "coverage", "robotic",
                *(("true bot recall",) if has_truth else ())):
        tab.add_column(col, justify="right")

    def f(v: float | None, nd: int) -> str:
        return "-" if v is None or v != v else f"{v:.{nd}f}"

    for name, r in [*s["slices"].items(), ("overall", s["overall"])]:
        rec = s.get("true_bot_recall") if name == "overall" else r.get("true_bot_recall")
        tab.add_row(name, f"{r['n']:,}", f(r["ivr"], 3), f(r["fpr"], 4), f"{r['n_purchased']:,}",
                    f(r["coverage"], 3), f"{r['n_robotic']:,}", *((f(rec, 3),) if has_truth else ()))
    Console().print(tab)
    if not s["has_purchases"]:
        print("no purchases in this dataset: FPR is not defined (IVR and robotic coverage only)")
