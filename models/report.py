"""``slidr report``: one Markdown file with PNG plots beside it (matplotlib, Agg backend).

Sections: baselines (the model from the model folder vs the MLP or the deep & cross network, logistic
regression and the velocity heuristic trained here on the same data), IVR-FPR curves per slice with the
calibrated operating points, global vs slice-level calibration at the same FPR budget, per-archetype
recall/precision (simulated data), weights ablation.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.calibrate import global_calibration, slice_calibration
from models.config import TrainConfig
from models.labels import TEST, TRAIN, VAL, label_audit, weak_labels
from models.metrics import (
    auc_interval,
    curve,
    evaluate,
    ivr_at_fpr,
    new_target_mask,
    recall_at_fir,
    roc_auc,
    row_thresholds,
    threshold_at_fpr,
)
from models.pipeline import CALIBRATION, MANIFEST, MODEL, load_training_data, read_json, write_json
from models.train import TrainingData

log = logging.getLogger(__name__)


def _f(v: Any, nd: int = 4) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{v:.{nd}f}" if isinstance(v, (float, np.floating)) else str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_f(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _scores_of(kind: str, td: TrainingData, cfg: TrainConfig) -> tuple[np.ndarray, dict[str, Any]]:
    from models.nets import predict
    from models.train import train

    model, hist = train(td, cfg.replace(model=kind, progress=False), kind)
    return predict(model, td.x), hist


KINDS = ("mlp", "dcn", "logreg", "heuristic")


def baselines(td: TrainingData, served: np.ndarray, cfg: TrainConfig, served_kind: str = "mlp",
              served_training: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Test-split figures of the served model (``served``: its scores, of kind ``served_kind``) and every other kind
    trained here with the same config (the 3-layer MLP, the deep & cross network, logistic regression, the
    velocity heuristic), at the same single-threshold FPR budget. Each row has the validation day's weighted
    loss (``val_loss``: what picks between the learned kinds, the truth never does): of those trained here, and of
    the served one from its manifest's ``served_training`` (``training.best_val_loss``)."""
    out: dict[str, dict[str, Any]] = {}
    te, va = td.rows(TEST), td.rows(VAL)
    for kind in KINDS:
        hist: dict[str, Any] = {}
        s, hist = (served, served_training or {}) if kind == served_kind else _scores_of(kind, td, cfg)
        t = threshold_at_fpr(s[va], td.purchased[va], cfg.fpr_budget)  # chosen on validation
        flag = s[te] >= t
        row: dict[str, Any] = {
            "auc": roc_auc(s[te], td.label[te]),
            "ivr_at_budget_test": ivr_at_fpr(s[te], td.purchased[te], cfg.fpr_budget),
            "val_threshold_ivr": float(flag.mean()),
            "val_threshold_fpr": float(flag[td.purchased[te]].mean()) if td.purchased[te].any() else None,
        }
        if kind == served_kind:  # bootstrap 95% interval of the served model's test AUC (few purchases: wide)
            row["auc_ci95"] = list(auc_interval(s[te], td.label[te]))
        if hist.get("best_val_loss") is not None:
            row["val_loss"] = hist["best_val_loss"]
        tr = td.truth(te)
        if tr is not None:
            r = recall_at_fir(s[te], tr[0], tr[1], 0.01)
            row["recall_at_1pct_fir"] = r["bot_recall"]
            row["archetypes"] = {a: v["invalidated"] for a, v in r["archetypes"].items() if v["is_bot"]}
        out[kind + (" (served)" if kind == served_kind else "")] = row | {"scores": s}
    return out


def lightgbm_reference(td: TrainingData, mlp_scores: np.ndarray, cfg: TrainConfig) -> dict[str, Any] | None:
    """LightGBM on the MLP's inputs (the same features, ``cfg.drop_features`` zeroed as inside the graph), labels and
    sample weights, early-stopped on the validation day: how far the served network is from a strong tabular
    learner. Test-day AUC against the weak labels and, on simulated data, recall at 1% human false-invalidation
    per archetype beside the MLP's. None when lightgbm is not installed (it is in the ``train`` extra)."""
    try:
        import lightgbm as lgb
    except ImportError:
        return None
    from models.train import sample_weights
    from stream.features import CATEGORIES, FEATURE_NAMES

    x = td.x.copy()
    x[:, [FEATURE_NAMES.index(n) for n in cfg.drop_features]] = 0.0
    cats = [FEATURE_NAMES.index(n) for n, _ in CATEGORIES if n not in cfg.drop_features]  # its own categorical splits
    tr, va, te = td.rows(TRAIN), td.rows(VAL), td.rows(TEST)
    params = {"objective": "binary", "learning_rate": 0.05, "num_leaves": 31, "min_data_in_leaf": 50,
              "bagging_fraction": 0.8, "bagging_freq": 1, "feature_fraction": 0.9, "seed": cfg.seed,
              "num_threads": max(1, cfg.threads), "verbose": -1}
    dtrain = lgb.Dataset(x[tr], td.label[tr], weight=sample_weights(td, tr, cfg), categorical_feature=cats)
    dval = lgb.Dataset(x[va], td.label[va], weight=sample_weights(td, va, cfg), reference=dtrain)
    booster = lgb.train(params, dtrain, num_boost_round=400, valid_sets=[dval],
                        callbacks=[lgb.early_stopping(20, verbose=False)])
    s = np.asarray(booster.predict(x, num_iteration=booster.best_iteration), dtype=np.float64)
    out: dict[str, Any] = {"trees": int(booster.best_iteration or booster.current_iteration()),
                           "auc": {"lightgbm": roc_auc(s[te], td.label[te]),
                                   "mlp": roc_auc(mlp_scores[te], td.label[te])}}
    truth = td.truth(te)
    if truth is not None:
        for name, sc in (("lightgbm", s), ("mlp", mlp_scores)):
            r = recall_at_fir(sc[te], truth[0], truth[1], 0.01)
            out[name] = {"bot_recall": r["bot_recall"],
                         "archetypes": {a: v["invalidated"] for a, v in r["archetypes"].items() if v["is_bot"]}}
    return out


def _plot_curves(path: Path, td: TrainingData, s: np.ndarray, cal_slice: dict[str, Any],
                 cal_global: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    va = td.rows(VAL)
    names = sorted(set(td.slices[va].tolist()))
    cols = 3
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, name in zip(axes.ravel(), names, strict=False):
        m = va & (td.slices == name)
        c = curve(s[m], td.purchased[m], td.heavy[m], points=400)
        xmax = min(1.0, max(0.05, 6 * float(cal_slice["fpr_budget"] or 0.01)))
        shown = [float(np.interp(xmax, c.fpr[::-1], c.ivr[::-1]))]  # IVR at the panel's edge (IVR rises with FPR)
        ax.plot(c.fpr, c.ivr, lw=1.2, label="IVR(FPR)")
        ft = cal_slice["validation"]["slices"].get(name, {})
        a, b, q = ft.get("fit_abc", [0, 0, 0])
        if not ft.get("pinned", True):
            f = np.linspace(0, ft["fit_fpr_max"], 50)
            ax.plot(f, a + b * f + q * f * f, "--", lw=1, label="concave fit")
            shown.append(float((a + b * f + q * f * f)[f <= xmax].max(initial=0.0)))
        for cal, mk, lab in ((cal_slice, "o", "slice-level"), (cal_global, "s", "global")):
            t = cal["thresholds"].get(name, cal["default_threshold"])
            fl = s[m] >= t
            fpr = fl[td.purchased[m]].mean() if td.purchased[m].any() else 0.0
            ax.plot([fpr], [fl.mean()], mk, ms=7, label=lab)
            shown.append(float(fl.mean()))
        ax.set_xlim(0, xmax)
        top = float(np.nanmax(shown)) if np.isfinite(shown).any() else 0.0
        ax.set_ylim(0, min(1.0, 1.1 * top) or 1.0)  # each panel to its data (the curves live under 0.25)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("FPR (purchasing clicks invalidated)")
        ax.set_ylabel("IVR")
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_bars(path: Path, title: str, groups: dict[str, dict[str, float]], ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for g in groups.values() for k in g})
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(keys) * len(groups) / 2), 3.4))
    w = 0.8 / max(len(groups), 1)
    for j, (gname, vals) in enumerate(groups.items()):
        ax.bar(np.arange(len(keys)) + j * w, [vals.get(k, 0.0) or 0.0 for k in keys], w, label=gname)
    ax.set_xticks(np.arange(len(keys)) + w * (len(groups) - 1) / 2, keys, rotation=20, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def label_rules(td: TrainingData, cfg: TrainConfig) -> dict[str, np.ndarray]:
    """The weak labels under each rule: SLIDR's (purchase or high RFM outside the robotic set, the baseline), with
    the account-history check (a high RFM counts only on a click like the account's earlier sessions), and the
    labels the model was trained on (``as_trained``: the config's rule, with the purchase sessions when
    ``purchase_session_h`` > 0)."""
    if td.rfm is None or td.rfm_consistent is None:
        return {}
    robotic = td.heavy if cfg.robotic_overrides_rfm else None
    return {"slidr": weak_labels(td.purchased, td.rfm, cfg.rfm_threshold, robotic),
            "rfm_needs_history": weak_labels(td.purchased, td.rfm, cfg.rfm_threshold, robotic, td.rfm_consistent),
            "as_trained": td.label}


def label_audit_section(td: TrainingData, cfg: TrainConfig | None = None
                        ) -> tuple[list[str], dict[str, Any]] | None:
    """Markdown and figures of the weak labels against the truth, per split (simulated data only, else None);
    with ``cfg``, also each labelling rule's audit on the training split (``label_rules``)."""
    splits = [("train", td.rows(TRAIN)), ("val", td.rows(VAL)), ("test", td.rows(TEST))]
    audits: dict[str, Any] = {}
    for name, m in splits:
        tr = td.truth(m)
        if tr is None:
            return None
        audits[name] = label_audit(td.label[m], tr[0], tr[1])
    rules = label_rules(td, cfg) if cfg is not None else {}
    tr_m = td.rows(TRAIN)
    tr = td.truth(tr_m)
    by_rule = {k: label_audit(v[tr_m], tr[0], tr[1]) for k, v in rules.items()} if tr is not None else {}
    names = sorted({a for au in audits.values() for a in au["archetypes"]})
    rows: list[list[Any]] = [[a] + [au["archetypes"].get(a, {}).get("called_human")
                                    for au in audits.values()] for a in names]
    rows += [[f"**{k.replace('_', ' ')}**"] + [au[k] for au in audits.values()]
             for k in ("bots_called_human", "human_precision", "human_recall")]
    md = ["## Weak labels against the truth (simulated data)", "",
          "Share of each archetype's clicks the weak labels (purchase, or RFM score >= threshold outside the "
          "robotic set) call human; below, the weak labels' precision and recall for humans. The truth is only "
          "read here, never in training.", "",
          _table(["archetype"] + [f"called human ({n})" for n in audits], rows), ""]
    if by_rule:
        names = sorted({a for au in by_rule.values() for a in au["archetypes"]})
        rrows: list[list[Any]] = [[a] + [au["archetypes"].get(a, {}).get("called_human") for au in by_rule.values()]
                                  for a in names]
        rrows += [[f"**{k.replace('_', ' ')}**"] + [au[k] for au in by_rule.values()]
                  for k in ("bots_called_human", "human_precision", "human_recall")]
        md += ["Labelling rules on the training split (this model was trained with "
               f"{'rfm_needs_history' if cfg is not None and cfg.rfm_needs_history else 'slidr'}): `slidr` = SLIDR's "
               "rule (the baseline); `rfm_needs_history` = a high RFM score counts only on a click whose user agent or "
               "IP /24 its account used in an earlier session (`models.labels.consistent_with_history`); "
               "`as trained` = the labels this model was trained on: its config's rule, and a purchase also making "
               f"its session's clicks within {cfg.purchase_session_h if cfg is not None else 0:g} h of it human "
               "(`models.labels.purchase_sessions`; 0 = off).", "",
               _table(["archetype"] + [f"called human ({n})" for n in by_rule], rrows), ""]
        audits = audits | {"rules_train": by_rule}
    return md, audits


def weights_ablation(td: TrainingData, cfg: TrainConfig) -> dict[str, Any]:
    """MLP with vs without sample weights over a few seeds: overall and night-hour figures on the test day.

    Stability = the spread across seeds of the night-hour IVR at the validation-chosen threshold, and how
    far night IVR sits from day IVR.
    """
    te, va = td.rows(TEST), td.rows(VAL)
    night = np.isin(td.hour, np.array(cfg.night_hours))
    out: dict[str, Any] = {}
    for use in (True, False):
        runs = []
        per_hour = []
        for seed in range(cfg.ablation_seeds):
            s, _ = _scores_of("mlp", td, cfg.replace(use_weights=use, seed=cfg.seed + seed))
            t = threshold_at_fpr(s[va], td.purchased[va], cfg.fpr_budget)
            flag = s >= t
            mn, md = te & night, te & ~night
            r = {"auc": roc_auc(s[te], td.label[te]), "night_auc": roc_auc(s[mn], td.label[mn]),
                 "night_ivr": float(flag[mn].mean()) if mn.any() else float("nan"),
                 "day_ivr": float(flag[md].mean()) if md.any() else float("nan"),
                 "night_fpr": float(flag[mn & td.purchased].mean()) if (mn & td.purchased).any() else float("nan")}
            tr = td.truth(mn)
            if tr is not None:
                r["night_bot_recall"] = float(flag[mn][tr[0]].mean()) if tr[0].any() else float("nan")
            runs.append(r)
            per_hour.append([float(flag[te & (td.hour == h)].mean()) if (te & (td.hour == h)).any()
                             else float("nan") for h in range(24)])
        keys = runs[0].keys()
        out["weighted" if use else "unweighted"] = {
            "mean": {k: float(np.nanmean([r[k] for r in runs])) for k in keys},
            "std": {k: float(np.nanstd([r[k] for r in runs])) for k in keys},
            "per_hour_ivr": np.nanmean(np.array(per_hour), axis=0).tolist(),
            "per_hour_ivr_std": np.nanstd(np.array(per_hour), axis=0).tolist(),
        }
    return out


def group_ablation(td: TrainingData, mlp_scores: np.ndarray, cfg: TrainConfig) -> dict[str, Any]:
    """The MLP retrained without each feature group (``stream.features.FEATURE_GROUPS``, zeroed inside the graph
    as ``cfg.drop_features`` are), same config and seed: test-day AUC against the weak labels and, on simulated
    data, bot recall at 1% human false-invalidation overall and per archetype; ``all`` is the served model.
    A group whose removal costs nothing carries nothing the others do not; a large drop marks what a bot
    archetype is caught by."""
    from stream.features import FEATURE_GROUPS

    te = td.rows(TEST)
    truth = td.truth(te)

    def row(sc: np.ndarray) -> dict[str, Any]:
        r: dict[str, Any] = {"auc": roc_auc(sc[te], td.label[te])}
        if truth is not None:
            fir = recall_at_fir(sc[te], truth[0], truth[1], 0.01)
            r["bot_recall"] = fir["bot_recall"]
            r["archetypes"] = {a: v["invalidated"] for a, v in fir["archetypes"].items() if v["is_bot"]}
        return r

    out: dict[str, Any] = {"all": row(mlp_scores)}
    for group, names in FEATURE_GROUPS:
        drop = tuple(dict.fromkeys((*cfg.drop_features, *names)))
        sc, _ = _scores_of("mlp", td, cfg.replace(drop_features=drop))
        out[group] = row(sc)
    return out


def _plot_ablation(path: Path, ab: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.4))
    for name, r in ab.items():
        m, sd = np.array(r["per_hour_ivr"]), np.array(r["per_hour_ivr_std"])
        ax.plot(range(24), m, marker="o", ms=3, label=name)
        ax.fill_between(range(24), m - sd, m + sd, alpha=0.2)
    ax.set_xlabel("hour of day (local)")
    ax.set_ylabel("IVR on the test day")
    ax.set_title("weights ablation: IVR by hour (mean ± std over seeds)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(model_dir: Path, data_dir: Path, out: Path, *, ablation: bool = True,
                 groups: bool = False, td: TrainingData | None = None) -> Path:
    """Write ``out/report.md`` (+ PNGs and report.json) for a calibrated model folder; return its path."""
    from models.export import score_onnx

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_json(model_dir / MANIFEST)
    cfg = TrainConfig.from_dict(manifest.get("config", {}))
    td = td or load_training_data(data_dir, cfg)
    s = score_onnx(model_dir / MODEL, td.x)
    cal = read_json(model_dir / CALIBRATION)
    budget = float(cal.get("fpr_budget") or cfg.fpr_budget)
    cfg = cfg.replace(fpr_budget=budget)
    va, te = td.rows(VAL), td.rows(TEST)
    md: list[str] = [f"# slidr model report: {manifest['model_version']}", "",
                     f"Data: `{data_dir}` ({manifest.get('data_dir', '')}), {len(td.x)} clicks; "
                     f"train/val/test rows {int(td.rows(0).sum())}/{int(va.sum())}/{int(te.sum())}; "
                     f"FPR budget {budget:g}; coverage floor {cfg.coverage_floor:g} (k = {cfg.coverage_k}).", ""]
    lm = td.meta.get("label_maturity")
    if lm:
        md += [f"{lm['left_out']} clicks left out as not yet labelled (attribution window {lm['window_h']:g} h: "
               f"{lm['young']} younger than it at the data's end, {lm['outage_overlap']} overlapping a label "
               "outage).", ""]
    figures: dict[str, Any] = {"model_version": manifest["model_version"], "fpr_budget": budget,
                               "label_maturity": lm}

    # --- baselines -----------------------------------------------------------------------------------------
    bl = baselines(td, s, cfg, manifest.get("kind", "mlp"), manifest.get("training"))
    truth = td.truth(te) is not None
    hdr = ["model", "test AUC", f"test IVR @ FPR<={budget:g}", "IVR (val thr.)", "FPR (val thr.)", "val loss"]
    hdr += ["bot recall @ 1% FIR"] if truth else []
    rows = [[k, r["auc"], r["ivr_at_budget_test"], r["val_threshold_ivr"], r["val_threshold_fpr"], r.get("val_loss")]
            + ([r["recall_at_1pct_fir"]] if truth else []) for k, r in bl.items()]
    served_row = next(r for k, r in bl.items() if k.endswith("(served)"))
    lo, hi = served_row["auc_ci95"]
    md += ["## Baselines (held-out test day, one threshold)", "",
           "IVR at the budget: the best single threshold on the test day itself; (val thr.): the threshold "
           "chosen on the validation day applied to the test day; val loss: the weighted validation loss of the "
           "kinds trained here (what chooses between them; the served model's is in its manifest).", "",
           _table(hdr, rows), "",
           f"Served model's test AUC (weak labels) {_f(served_row['auc'])}, bootstrap 95% interval "
           f"[{_f(lo)}, {_f(hi)}] (1,000 resamples within each label class; "
           f"{int((td.label[te] == 0).sum())} test clicks labelled human).", ""]
    if truth:
        names = sorted(next(iter(bl.values()))["archetypes"])
        md += ["Bot recall at 1% human false-invalidation per archetype (test day):", "",
               _table(["archetype", *bl], [[a, *(r["archetypes"][a] for r in bl.values())] for a in names]), ""]
    figures["baselines"] = {k: {kk: vv for kk, vv in r.items() if kk != "scores"} for k, r in bl.items()}
    ref = lightgbm_reference(td, s, cfg)
    if ref is not None:
        figures["lightgbm_reference"] = ref
        md += ["## LightGBM reference (not served)", "",
               f"LightGBM ({ref['trees']} trees, early-stopped on validation) on the MLP's inputs, labels and weights. "
               f"Test AUC (weak labels): LightGBM {_f(ref['auc']['lightgbm'])}, MLP {_f(ref['auc']['mlp'])}.", ""]
        if "mlp" in ref:
            names = sorted(ref["mlp"]["archetypes"])
            lrows = [[a, ref["lightgbm"]["archetypes"][a], ref["mlp"]["archetypes"][a]] for a in names]
            lrows.append(["**all bots**", ref["lightgbm"]["bot_recall"], ref["mlp"]["bot_recall"]])
            md += ["Bot recall at 1% human false-invalidation (test day):", "",
                   _table(["archetype", "LightGBM", "MLP"], lrows), ""]

    # --- calibration: global vs slice-level -----------------------------------------------------------------
    args = (s[va], td.purchased[va], td.heavy[va], td.slices[va])
    labelled = td.labelled_human()[va]
    cal_g = global_calibration(*args, budget, cfg.coverage_floor, cfg.curve_points, cfg.slice_cap(budget),
                               cfg.min_slice_purchases, labelled)
    cal_knee = global_calibration(*args, None, cfg.coverage_floor, cfg.curve_points)
    try:
        cal_s = slice_calibration(*args, budget, cfg.coverage_floor, cfg.fit_span, cfg.min_slice_purchases,
                                  cfg.curve_points, cfg.min_slice_robotic, cfg.slice_cap(budget), labelled)
    except ValueError as e:
        cal_s = None
        md += [f"Slice-level calibration failed: {e}", ""]
    cmp_rows = []
    for name, c in (("global knee", cal_knee), (f"global @ {budget:g}", cal_g), (f"slice @ {budget:g}", cal_s)):
        if c is None:
            continue
        for split_name, m in (("val", va), ("test", te)):
            thr = row_thresholds(td.slices[m], c["thresholds"], c["default_threshold"])
            ev = evaluate(s[m], thr, td.purchased[m], td.heavy[m], td.slices[m], td.label[m], td.truth(m))
            o = ev["overall"]
            floors = min((v["coverage"] for v in ev["slices"].values() if v["n_robotic"]), default=float("nan"))
            cmp_rows.append([name, split_name, o["ivr"], o["fpr"], o["coverage"], floors]
                            + ([o["bot_recall"], o["human_false_invalidation"]] if truth else []))
    figures["calibration"] = cmp_rows
    hdr = ["calibration", "split", "IVR", "FPR", "coverage", "min slice coverage"]
    hdr += ["bot recall", "human FIR"] if truth else []
    md += ["## Calibration: global vs slice-level", "",
           "Calibrated on the validation day; the test day shows how it carries over."
           + (f" Both at {budget:g} keep every slice with enough purchases at an FPR of at most "
              f"{cfg.slice_cap(budget):g} (slice_fpr_cap), on its purchasing clicks and on all the clicks the weak "
              f"labels call human (labelled FPR)." if cfg.slice_cap(budget) else ""),
           "", _table(hdr, cmp_rows), ""]
    if cal_s is not None:
        srows = [[k, v["threshold"], v["volume_share"], v["purchase_share"], v["ivr"], v["fpr"],
                  v.get("labelled_fpr", float("nan")), v["fpr_floor"], v["coverage"], "yes" if v["pinned"] else ""]
                 for k, v in sorted(cal_s["validation"]["slices"].items())]
        md += ["Slice-level thresholds (validation):", "",
               _table(["slice", "threshold", "clicks", "purchases", "IVR", "FPR", "labelled FPR", "FPR floor",
                       "coverage", "pinned"], srows), ""]
        _plot_curves(out / "curves.png", td, s, cal_s, cal_g)
        md += ["![IVR-FPR curves per slice](curves.png)", ""]

    # --- archetypes ----------------------------------------------------------------------------------------
    if truth:
        tr = td.truth(te)
        assert tr is not None
        thr = row_thresholds(td.slices[te], cal["thresholds"], cal["default_threshold"])
        at_cal = evaluate(s[te], thr, td.purchased[te], td.heavy[te], td.slices[te], td.label[te], tr)["truth"]
        at_fir = recall_at_fir(s[te], tr[0], tr[1], 0.01)
        arows = [[a, v["n"], "bot" if v["is_bot"] else "human", v["invalidated"], v["precision"],
                  at_fir["archetypes"][a]["invalidated"]] for a, v in sorted(at_cal["archetypes"].items())]
        md += ["## Per archetype (simulated truth, test day)", "",
               f"With the model's own calibration ({cal['method']}): bot recall {_f(at_cal['bot_recall'])}, "
               f"human false-invalidation {_f(at_cal['human_false_invalidation'])}, precision "
               f"{_f(at_cal['precision'])}. At <= 1% human false-invalidation (one threshold): bot recall "
               f"{_f(at_fir['bot_recall'])}.", "",
               "invalidated = recall for bot archetypes, false-invalidation for human ones; precision = "
               "flagged_a / (flagged_a + flagged humans).", "",
               _table(["archetype", "clicks", "kind", "invalidated (calibrated)", "precision (calibrated)",
                       "invalidated @ 1% FIR"], arows), ""]
        if td.ad_ids is not None and td.is_bot is not None:  # bot clicks on ads no bot clicked in the training
            new = new_target_mask(td.ad_ids, td.is_bot, td.split == TRAIN)[te] & tr[0]  # days, same threshold
            flag = s[te] >= at_fir["threshold"]
            unseen = {"n": int(new.sum()), "share_of_bot_clicks": float(new.sum() / max(int(tr[0].sum()), 1)),
                      "ads": len(np.unique(td.ad_ids[te][new])),
                      "recall_at_1pct_fir": float(flag[new].mean()) if new.any() else None}
            at_fir["unseen_target_ads"] = unseen
            md += [f"Bot clicks on ads no bot clicked in the training days: {unseen['n']} "
                   f"({_f(unseen['share_of_bot_clicks'])} of the test day's bot clicks, {unseen['ads']} ads); bot "
                   f"recall on them at the same 1% threshold: {_f(unseen['recall_at_1pct_fir'])}.", ""]
        _plot_bars(out / "archetypes.png", "recall per bot archetype (test day)",
                   {"calibrated": {a: v["invalidated"] for a, v in at_cal["archetypes"].items() if v["is_bot"]},
                    "@1% FIR": {a: v["invalidated"] for a, v in at_fir["archetypes"].items() if v["is_bot"]}},
                   "recall")
        md += ["![per-archetype recall](archetypes.png)", ""]
        figures["archetypes"] = {"calibrated": at_cal, "at_1pct_fir": at_fir}
    la = label_audit_section(td, cfg)
    if la is not None:
        md += la[0]
        figures["label_audit"] = la[1]

    # --- weights ablation ----------------------------------------------------------------------------------
    if ablation:
        ab = weights_ablation(td, cfg)
        figures["ablation"] = ab
        keys = list(ab["weighted"]["mean"].keys())
        arows = [[k, ab["weighted"]["mean"][k], ab["weighted"]["std"][k], ab["unweighted"]["mean"][k],
                  ab["unweighted"]["std"][k]] for k in keys]
        md += ["## Sample weights ablation (MLP, test day)", "",
               f"{cfg.ablation_seeds} seeds per variant; night = local hours {list(cfg.night_hours)}; IVR/FPR at "
               "the threshold chosen on validation for the FPR budget.", "",
               _table(["metric", "weighted mean", "weighted std", "unweighted mean", "unweighted std"], arows), ""]
        _plot_ablation(out / "ablation.png", ab)
        md += ["![weights ablation](ablation.png)", ""]

    # --- feature-group ablation ----------------------------------------------------------------------------
    if groups:
        ga = group_ablation(td, s, cfg)
        figures["group_ablation"] = ga
        base = ga["all"]
        archs = sorted(base.get("archetypes", {}))
        grows = [[g, r["auc"], r["auc"] - base["auc"],
                  *([r["bot_recall"], r["bot_recall"] - base["bot_recall"], *(r["archetypes"][a] for a in archs)]
                    if "bot_recall" in r else [])] for g, r in ga.items()]
        md += ["## Feature-group ablation (MLP retrained without each group, test day)", "",
               "AUC against the weak labels; bot recall at 1% human false-invalidation (simulated truth), overall "
               "and per archetype; `all` is the served model.", "",
               _table(["dropped", "AUC", "ΔAUC", *(["bot recall", "Δrecall", *archs] if archs else [])], grows),
               ""]

    md += [f"_Generated in {time.perf_counter() - t0:.0f} s._", ""]
    write_json(out / "report.json", figures)
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path
