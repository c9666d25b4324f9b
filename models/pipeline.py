"""Model folder steps behind the CLI: train -> model.onnx + manifest, calibrate, evaluate; and all in one.

    from models.pipeline import build_model
    summary = build_model("data/small", "models/out/mlp")   # train + calibrate + evaluate (+ report)
"""

from __future__ import annotations

import logging
import math
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from models.config import TrainConfig
from models.labels import TEST, TRAIN, VAL
from models.metrics import evaluate, ivr_at_fpr, recall_at_fir, roc_auc, row_thresholds
from models.registry import MANIFEST, sha256_file
from models.train import TrainingData, build_training_data
from stream.scoring import EXPLAINER_FILE as EXPLAINER  # an ensemble's member 0: the reason codes' network

log = logging.getLogger(__name__)

MODEL = "model.onnx"
CALIBRATION = "calibration.json"
SPLITS = {"train": TRAIN, "val": VAL, "test": TEST}
REFERENCE_MIN_ROWS = 50  # clicks behind a slice's reason-code reference, at least
EXPORT_TOLERANCE = 1e-5  # max |onnxruntime - torch| accepted at export


def _clean(o: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return f if math.isfinite(f) else None
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.bool_):
        return bool(o)
    return o


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(orjson.dumps(_clean(obj), option=orjson.OPT_INDENT_2))
    tmp.replace(path)


def read_json(path: Path) -> dict[str, Any]:
    return dict(orjson.loads(path.read_bytes()))


def load_training_data(data_dir: Path, cfg: TrainConfig) -> TrainingData:
    from models.data.dataset import load_dataset
    from slidr.settings import get_settings

    t0 = time.perf_counter()
    ds = load_dataset(data_dir)
    td = build_training_data(ds, cfg, cache_dir=get_settings().cache_dir)
    lm = mask_unlabelled(td, ds, cfg)
    log.info("training data from %s: %d rows in %.1f s; %d left out as not yet labelled (attribution window "
             "%g h: %d younger than it at the data's end, %d overlapping a label outage), %d in outages",
             data_dir, len(td.x), time.perf_counter() - t0, lm["left_out"], lm["window_h"], lm["young"],
             lm["outage_overlap"], lm["in_declared_outage"])
    return td


def mask_unlabelled(td: TrainingData, ds: Any, cfg: TrainConfig) -> dict[str, Any]:
    """Leave out of every split the clicks whose weak label is not final (``models.labels.mature_labels``):
    younger than ``cfg.attribution_window_h`` (+ ``purchase_session_h``) at the data's end, or with that window
    overlapping a label outage (declared in meta.json; with ``allow_label_gaps`` also the hours
    ``guardrails.label_gap_hours`` detects).

    Narrows ``td.usable`` in place, re-cuts the split on the labelled span (``time_split(labelled=...)``: short
    data would otherwise lose its test split), re-checks the train and val splits, and returns the counts, also
    kept in ``td.meta["label_maturity"]`` (the manifest's ``training.label_maturity``).
    """
    from models import guardrails
    from models.labels import HOUR_MS, labels_end_ms, mature_labels, time_split

    end = labels_end_ms(td.meta, td.ts, np.array([p.ts for p in ds.purchases], dtype=np.int64))
    outages = list(ds.label_outages)
    gaps = guardrails.label_gap_hours(td.ts, td.purchased, ~td.usable) if cfg.allow_label_gaps else []
    outages += [(h, h + HOUR_MS) for h in gaps]
    # a label also waits for the purchases of its session's clicks up to purchase_session_h later (they vouch for
    # it: labels.purchase_sessions); an attribution window of 0 declares labels final at once
    window_h = cfg.attribution_window_h + cfg.purchase_session_h if cfg.attribution_window_h > 0 else 0.0
    young, overlap = mature_labels(td.ts, round(window_h * HOUR_MS), end, outages)
    before = td.usable.copy()
    td.usable = before & ~young & ~overlap
    td.split = time_split(td.ts, td.meta.get("start_ms"), cfg.test_days, cfg.val_days, cfg.val_frac,
                          cfg.test_frac, labelled=td.usable)
    out = before & ~td.usable
    info: dict[str, Any] = {
        "window_h": window_h, "end_ms": end, "left_out": int(out.sum()),
        "young": int((out & young).sum()), "outage_overlap": int((out & ~young).sum()),
        "in_declared_outage": int((~before).sum()), "detected_gap_hours": [int(h) for h in gaps],
        "left_out_by_split": {n: int((out & (td.split == i)).sum()) for n, i in SPLITS.items()},
        "labelled_by_split": {n: int(td.rows(i).sum()) for n, i in SPLITS.items()}}
    td.meta["label_maturity"] = info
    for name in ("train", "val"):
        m = td.rows(SPLITS[name])
        guardrails.check_split(td.label[m], td.purchased[m], name)
    return info


def _refresh_manifest(model_dir: Path, **updates: Any) -> dict[str, Any]:
    """Merge ``updates`` into manifest.json and recompute the sha256 of the model and calibration files."""
    mf = model_dir / MANIFEST
    manifest = read_json(mf) if mf.exists() else {}
    manifest.update(updates)
    manifest["sha256"] = {n: sha256_file(model_dir / n) for n in (MODEL, CALIBRATION, EXPLAINER)
                          if (model_dir / n).exists()}
    write_json(mf, manifest)
    return manifest


def model_metrics(scores: np.ndarray, td: TrainingData, m: np.ndarray, budget: float) -> dict[str, Any]:
    """Threshold-free summary of scores on rows ``m``: AUC, IVR at the FPR budget, truth recall at 1% FIR."""
    out: dict[str, Any] = {
        "rows": int(m.sum()),
        "auc": roc_auc(scores[m], td.label[m]),
        "ivr_at_budget": ivr_at_fpr(scores[m], td.purchased[m], budget),
        "fpr_budget": budget,
    }
    t = td.truth(m)
    if t is not None:
        r = recall_at_fir(scores[m], t[0], t[1], 0.01)
        out["recall_at_1pct_fir"] = r["bot_recall"]
        out["archetype_recall_at_1pct_fir"] = {a: v["invalidated"] for a, v in r["archetypes"].items()
                                               if v["is_bot"]}
    return out


def train_to_dir(data_dir: Path, out: Path, kind: str = "mlp", cfg: TrainConfig | None = None,
                 td: TrainingData | None = None) -> dict[str, Any]:
    """Train ``kind`` on a dataset folder and write model.onnx, a global calibration and manifest.json."""
    from models.calibrate import global_calibration
    from models.export import export_onnx, score_onnx
    from models.nets import Ensemble, predict
    from stream.features import COMBO_SHARDS, FEATURE_NAMES, FEATURE_SPEC_HASH

    cfg = (cfg or TrainConfig()).replace(model=kind)
    td = td or load_training_data(data_dir, cfg)
    model, hist = train_from(td, cfg)
    out.mkdir(parents=True, exist_ok=True)
    probe = np.arange(0, len(td.x), max(1, len(td.x) // 5000))  # thousands of rows across the data

    def export_checked(net: Any, path: Path) -> float:
        """Export ``net`` to ``path``; its largest difference from torch on the probe rows (refused over the
        tolerance)."""
        export_onnx(net, td.x.shape[1], path)
        d = float(np.abs(score_onnx(path, td.x[probe]) - predict(net, td.x[probe])).max()) if len(probe) else 0.0
        if d > EXPORT_TOLERANCE:
            raise RuntimeError(f"ONNX export of {path.name} differs from torch by {d:.3g} (> {EXPORT_TOLERANCE})")
        return d

    diff = export_checked(model, out / MODEL)
    scores = score_onnx(out / MODEL, td.x)
    explainer = None
    if isinstance(model, Ensemble):  # reason codes occlude each feature group of every invalid click: with one
        # member instead of all of them that call costs 1/len(members) (an attack's all-invalid batch)
        export_checked(model.members[0], out / EXPLAINER)
        explainer = {"file": EXPLAINER, "of": f"member 0 of {len(model.members)}"}
    elif (out / EXPLAINER).exists():
        (out / EXPLAINER).unlink()  # (a folder trained again as a single network)
    va, te = td.rows(VAL), td.rows(TEST)
    cal = global_calibration(scores[va], td.purchased[va], td.heavy[va], td.slices[va], cfg.fpr_budget,
                             cfg.coverage_floor, cfg.curve_points, cfg.slice_cap(), cfg.min_slice_purchases,
                             td.labelled_human()[va])
    write_json(out / CALIBRATION, cal)
    created = datetime.now(UTC)
    version = f"{kind}-{created.strftime('%Y%m%dT%H%M%SZ')}-{sha256_file(out / MODEL)[:8]}"
    manifest = _refresh_manifest(
        out, model_version=version, kind=kind, feature_spec_hash=FEATURE_SPEC_HASH, combo_shards=COMBO_SHARDS,
        feature_names=list(FEATURE_NAMES), created_at=created.isoformat(), training_window=td.window(),
        data_dir=str(data_dir), config=cfg.to_dict(), export_max_abs_diff=diff,
        reason_reference=reason_reference(td), explainer=explainer,
        training={k: v for k, v in hist.items() if k != "epochs"} | {"epochs": len(hist["epochs"]),
                                                                     "label_maturity": td.meta.get("label_maturity")},
        metrics={"val": model_metrics(scores, td, va, cfg.fpr_budget),
                 "test": model_metrics(scores, td, te, cfg.fpr_budget)})
    return manifest


def reason_reference(td: TrainingData) -> dict[str, Any]:
    """The reason codes' reference clicks (``stream.scoring.reason_groups``): per feature, the median (a hashed
    category: bucket 0, unknown) over the training split's weak-labelled human clicks (all training clicks when
    none is labelled human), overall (``all``) and per slice (``slices``: a slice with fewer than
    ``REFERENCE_MIN_ROWS`` such clicks has none and uses ``all``)."""
    tr = td.rows(TRAIN)
    human = tr & (td.label == 0)
    base = human if human.any() else tr if tr.any() else np.ones(len(td.x), dtype=bool)

    from stream.features import CATEGORIES, FEATURE_NAMES

    cats = [FEATURE_NAMES.index(n) for n, _ in CATEGORIES]

    def median(m: np.ndarray) -> list[float]:
        ref = np.median(td.x[m], axis=0) if m.any() else np.zeros(td.x.shape[1])
        ref[cats] = 0.0  # a hashed category's reference is "unknown" (bucket 0), not a median of bucket ids
        return [round(float(v), 6) for v in ref]

    slices = {str(sl): median(base & (td.slices == sl)) for sl in sorted(set(td.slices[base].tolist()))
              if int((base & (td.slices == sl)).sum()) >= REFERENCE_MIN_ROWS}
    return {"all": median(base), "slices": slices}


def train_from(td: TrainingData, cfg: TrainConfig) -> tuple[Any, dict[str, Any]]:
    from models.train import train

    return train(td, cfg, cfg.model)


def _model_cfg(model_dir: Path) -> TrainConfig:
    return TrainConfig.from_dict(read_json(model_dir / MANIFEST).get("config", {}))


def calibrate_dir(model_dir: Path, data_dir: Path, budget: float | None = None, method: str = "slice",
                  td: TrainingData | None = None) -> dict[str, Any]:
    """Calibrate thresholds on the validation split; writes calibration.json and updates the manifest.

    ``method="global"`` with ``budget=None`` takes the knee of the IVR-FPR curve.
    """
    from models.calibrate import global_calibration, slice_calibration
    from models.export import score_onnx

    cfg = _model_cfg(model_dir)
    td = td or load_training_data(data_dir, cfg)
    va = td.rows(VAL)
    s = score_onnx(model_dir / MODEL, td.x[va])
    if method == "global":
        cal = global_calibration(s, td.purchased[va], td.heavy[va], td.slices[va], budget,
                                 cfg.coverage_floor, cfg.curve_points,
                                 None if budget is None else cfg.slice_cap(budget), cfg.min_slice_purchases,
                                 td.labelled_human()[va])
    elif method == "slice":
        b = cfg.fpr_budget if budget is None else budget
        cal = slice_calibration(s, td.purchased[va], td.heavy[va], td.slices[va], b, cfg.coverage_floor,
                                cfg.fit_span, cfg.min_slice_purchases, cfg.curve_points,
                                cfg.min_slice_robotic, cfg.slice_cap(b), td.labelled_human()[va])
    else:
        raise ValueError(f"unknown calibration method {method!r}: slice | global")
    cal["calibrated_on"] = {"data_dir": str(data_dir), "split": "val", "rows": int(va.sum())}
    write_json(model_dir / CALIBRATION, cal)
    # thresholds are part of the model: a recalibrated model gets its own version, from its trained version and
    # the calibration's content (the registry refuses a version it holds with other files)
    trained = read_json(model_dir / MANIFEST).get("trained_version") or read_json(model_dir / MANIFEST)[
        "model_version"]
    _refresh_manifest(model_dir, trained_version=trained,
                      model_version=f"{trained}.cal-{sha256_file(model_dir / CALIBRATION)[:8]}",
                      calibration={"method": cal["method"], "fpr_budget": cal["fpr_budget"],
                                   "validation": cal["validation"]["overall"]})
    return cal


def evaluate_dir(model_dir: Path, data_dir: Path, split: str = "test",
                 td: TrainingData | None = None) -> dict[str, Any]:
    """Metrics of the model folder's calibrated decisions on one split (or ``all``) of a dataset."""
    from models.export import score_onnx

    cfg = _model_cfg(model_dir)
    td = td or load_training_data(data_dir, cfg)
    m = td.usable.copy() if split == "all" else td.rows(SPLITS[split])
    cal = read_json(model_dir / CALIBRATION)
    s = score_onnx(model_dir / MODEL, td.x[m])
    thr = row_thresholds(td.slices[m], cal["thresholds"], cal["default_threshold"])
    manifest = read_json(model_dir / MANIFEST)
    res = evaluate(s, thr, td.purchased[m], td.heavy[m], td.slices[m], td.label[m], td.truth(m))
    out: dict[str, Any] = {"model_version": manifest["model_version"], "kind": manifest["kind"],
                           "data_dir": str(data_dir), "split": split, "calibration": cal["method"],
                           "fpr_budget": cal.get("fpr_budget"), **res}
    t = td.truth(m)
    if t is not None:
        r = recall_at_fir(s, t[0], t[1], 0.01)
        out["at_1pct_human_false_invalidation"] = {
            "threshold": r["threshold"], "bot_recall": r["bot_recall"],
            "archetype_recall": {a: v["invalidated"] for a, v in r["archetypes"].items() if v["is_bot"]}}
    return dict(_clean(out))


def build_model(data_dir: str | Path, out: str | Path, kind: str = "mlp", fpr_budget: float | None = None,
                cfg: TrainConfig | None = None, report_dir: str | Path | None = None) -> dict[str, Any]:
    """Train, calibrate (slice-level) and evaluate in one go; optionally write the report. For demos.

    Returns {"model_dir", "model_version", "train_seconds", "evaluation" (test split), "report"}.
    """
    data_dir, out = Path(data_dir), Path(out)
    cfg = (cfg or TrainConfig()).replace(model=kind)
    td = load_training_data(data_dir, cfg)
    t0 = time.perf_counter()
    manifest = train_to_dir(data_dir, out, kind, cfg, td)
    calibrate_dir(out, data_dir, fpr_budget, "slice", td)
    ev = evaluate_dir(out, data_dir, "test", td)
    summary: dict[str, Any] = {"model_dir": str(out), "model_version": manifest["model_version"],
                               "train_seconds": time.perf_counter() - t0, "evaluation": ev}
    if report_dir is not None:
        from models.report import write_report

        summary["report"] = str(write_report(out, data_dir, Path(report_dir), td=td))
    return summary
