"""``slidr train | calibrate | evaluate | score | report | retrain`` and ``slidr models list | show | promote | rollback
| verify`` (see slidr/cli.py). Heavy imports stay inside commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def _config(sets: list[str]) -> Any:
    from models.config import TrainConfig
    from slidr.cliutil import parse_sets

    kw = parse_sets(sets)
    try:
        return TrainConfig.from_dict(kw)
    except (ValueError, TypeError) as e:
        raise typer.BadParameter(str(e)) from None


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add this area's commands to the ``slidr`` app."""

    @app.command("train")
    def train_cmd(
        data_dir: Path = typer.Argument(..., help="Dataset folder (slidr simulate / slidr import)."),  # noqa: B008
        out: Path = typer.Option(..., "--out", help="Model folder to write."),  # noqa: B008
        model: str = typer.Option("mlp", "--model", help="mlp | dcn | logreg | heuristic"),
        sets: list[str] = typer.Option([], "--set", help="Config override key=value (models/config.py)."),  # noqa: B008
    ) -> None:
        """Train a scorer on a dataset; write model.onnx, calibration.json (global) and manifest.json."""
        from models.calibrate import CalibrationError
        from models.guardrails import GuardrailError
        from models.pipeline import train_to_dir

        try:
            m = train_to_dir(data_dir, out, model, _config(sets))
        except (GuardrailError, CalibrationError, FileNotFoundError) as e:
            _fail(e)
        t = m["metrics"]["test"]
        typer.echo(f"{m['model_version']} -> {out}  test AUC {t['auc']:.4f}  "
                   f"IVR@FPR<={t['fpr_budget']:g} {t['ivr_at_budget']:.4f}"
                   + (f"  bot recall@1%FIR {t['recall_at_1pct_fir']:.4f}" if "recall_at_1pct_fir" in t else ""))

    @app.command("calibrate")
    def calibrate_cmd(
        model_dir: Path = typer.Argument(..., help="Model folder (slidr train)."),  # noqa: B008
        data_dir: Path = typer.Argument(..., help="Dataset folder; its validation split is used."),  # noqa: B008
        fpr_budget: float | None = typer.Option(None, "--fpr-budget", help="Overall FPR budget (default: config)."),
        use_global: bool = typer.Option(False, "--global", help="One threshold (the knee unless --fpr-budget)."),
    ) -> None:
        """Fit thresholds (per slice by default) and write calibration.json into the model folder."""
        from models.calibrate import CalibrationError
        from models.guardrails import GuardrailError
        from models.pipeline import calibrate_dir

        try:
            cal = calibrate_dir(model_dir, data_dir, fpr_budget, "global" if use_global else "slice")
        except (GuardrailError, CalibrationError, FileNotFoundError) as e:
            _fail(e)
        v = cal["validation"]["overall"]
        typer.echo(f"{cal['method']} calibration (validation): IVR {v['ivr']:.4f}  FPR {v['fpr']:.4f}  "
                   f"coverage {v['coverage']:.4f}")
        for s, t in sorted(cal["thresholds"].items()):
            typer.echo(f"  {s:12s} threshold {t:.4f}")

    @app.command("evaluate")
    def evaluate_cmd(
        model_dir: Path = typer.Argument(..., help="Calibrated model folder."),  # noqa: B008
        data_dir: Path = typer.Argument(..., help="Dataset folder."),  # noqa: B008
        split: str = typer.Option("test", "--split", help="train | val | test | all"),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ) -> None:
        """IVR, FPR, coverage, AUC overall and per slice (and truth recall on simulated data)."""
        import orjson

        from models.guardrails import GuardrailError
        from models.pipeline import evaluate_dir

        try:
            ev = evaluate_dir(model_dir, data_dir, split)
        except GuardrailError as e:
            _fail(GuardrailError(f"{e} (to apply a model to unlabelled traffic: slidr score MODEL DIR --out FILE)"))
        except (FileNotFoundError, KeyError) as e:
            _fail(e)
        if as_json:
            typer.echo(orjson.dumps(ev, option=orjson.OPT_INDENT_2).decode())
            return
        cols = ("n", "ivr", "fpr", "coverage", "auc", "bot_recall", "human_false_invalidation")
        typer.echo(f"{ev['model_version']} on {split} ({ev['calibration']} calibration)")
        typer.echo(f"{'slice':12s} " + " ".join(f"{c[:10]:>10s}" for c in cols))
        for name, row in [("overall", ev["overall"]), *sorted(ev["slices"].items())]:
            typer.echo(f"{name:12s} " + " ".join(_fmt(row.get(c)) for c in cols))

    @app.command("score")
    def score_cmd(
        model_dir: Path = typer.Argument(..., help="Calibrated model folder, or a registry folder (its ACTIVE "  # noqa: B008
                                         "model)."),
        data_dir: Path = typer.Argument(..., help="Dataset folder (labelled or not)."),  # noqa: B008
        out: Path = typer.Option(..., "--out", help="Per-click scores and decisions: .csv or .parquet."),  # noqa: B008
        as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
    ) -> None:
        """Score and decide every click of a dataset with the stream's own features, scorer and thresholds;
        per-slice IVR (FPR where there are purchases, coverage where there are robotic clicks)."""
        import orjson

        from models.score import print_summary, score_dataset
        from stream.scoring import ModelError

        try:
            summary = score_dataset(model_dir, data_dir, out)
        except (ModelError, FileNotFoundError, ValueError) as e:
            _fail(e)
        if as_json:
            typer.echo(orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode())
            return
        print_summary(summary)
        typer.echo(f"scores: {out}")

    @app.command("report")
    def report_cmd(
        model_dir: Path = typer.Argument(..., help="Calibrated model folder (the MLP)."),  # noqa: B008
        data_dir: Path = typer.Argument(..., help="Dataset folder it was trained on."),  # noqa: B008
        out: Path = typer.Option(..., "--out", help="Report folder (report.md + PNGs)."),  # noqa: B008
        ablation: bool = typer.Option(True, "--ablation/--no-ablation", help="Weights ablation (trains models)."),
        groups: bool = typer.Option(False, "--groups/--no-groups", help=(
            "Feature-group ablation: the MLP retrained without each feature group (one more training per group).")),
    ) -> None:
        """Markdown report: curves, baselines, global vs slice calibration, archetypes, weights and feature-group
        ablations."""
        from models.calibrate import CalibrationError
        from models.guardrails import GuardrailError
        from models.report import write_report

        try:
            path = write_report(model_dir, data_dir, out, ablation=ablation, groups=groups)
        except (GuardrailError, CalibrationError, FileNotFoundError) as e:
            _fail(e)
        typer.echo(f"report: {path}")

    register_models(app)
    register_retrain(app)


def _echo_json(obj: Any) -> None:
    import orjson

    typer.echo(orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode())


def _history_line(e: dict[str, Any]) -> str:
    when = str(e.get("time", ""))[:19].replace("T", " ")
    return (f"  {when}  {e['action']:11s} {e.get('from') or '-'} -> {e.get('to') or '-'}"
            + (f"  ({e['reason']})" if e.get("reason") else ""))


def register_models(app: typer.Typer) -> None:
    """``slidr models ...``: the registry (models/registry.py)."""
    models_app = typer.Typer(help="Model registry: list, show, publish, promote, rollback, verify.",
                             no_args_is_help=True)
    app.add_typer(models_app, name="models")

    @models_app.command("list")
    def list_cmd(as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
        """Versions with their states (candidate, active, stable, retired), then the history of every change."""
        from models import registry

        try:
            st, hist = registry.states(), registry.history()
            act, stab = registry.active_version(), registry.stable_version()
        except registry.RegistryError as e:
            _fail(e)
        if as_json:
            _echo_json({"active": act, "stable": stab, "versions": st, "history": hist})
            return
        typer.echo(f"registry {registry._root(None)}: active {act or '-'}, stable {stab or '-'}")
        for v, states in st.items():
            typer.echo(f"  {v:60s} {', '.join(states)}")
        typer.echo("history:")
        for entry in hist:
            typer.echo(_history_line(entry))

    @models_app.command("show")
    def show_cmd(version: str = typer.Argument(..., help="A registered version."),
                 as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
        """A version's states, manifest summary (training window, metrics, file hashes) and history."""
        from models import registry

        try:
            d = registry.describe(version)
        except registry.RegistryError as e:
            _fail(e)
        if as_json:
            _echo_json(d)
            return
        m = d["manifest"]
        typer.echo(f"{d['version']}  [{', '.join(d['states'])}]  {d['folder']}")
        for k in ("kind", "trained_version", "created_at", "data_dir", "feature_spec_hash"):
            if k in m:
                typer.echo(f"  {k}: {m[k]}")
        t = (m.get("metrics") or {}).get("test")
        if t:
            typer.echo(f"  test: AUC {t.get('auc')}  IVR at budget {t.get('ivr_at_budget')}")
        for name, digest in (m.get("sha256") or {}).items():
            typer.echo(f"  sha256 {name}: {digest}")
        for entry in d["history"]:
            typer.echo(_history_line(entry))

    @models_app.command("publish")
    def publish_cmd(folder: Annotated[Path, typer.Argument(help="A model folder (slidr calibrate's output).")],
                    activate: bool = typer.Option(True, help="Point ACTIVE at it."),
                    stable: bool = typer.Option(False, "--stable", help="Point STABLE at it too (it is marked "
                                                "stable anyway when the registry has no stable model yet)."),
                    as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
        """Register a model folder under its manifest's version (files verified against their sha256) and, by
        default, make it active: what a deployment's one-shot setup job runs (deploy/compose, deploy/k8s)."""
        from models import registry

        before = registry.active_version()
        try:
            v = registry.publish(folder, activate=activate, stable=stable)
        except registry.RegistryError as e:
            _fail(e)
        if as_json:
            _echo_json({"ok": True, "version": v, "active": registry.active_version(), "from": before})
        else:
            typer.echo(f"published {v}; active: {before or '-'} -> {registry.active_version() or '-'}")

    @models_app.command("promote")
    def promote_cmd(version: str = typer.Argument(..., help="A registered version."),
                    reason: str = typer.Option("", "--reason", help="Recorded in the history."),
                    as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
        """Make VERSION active after verifying every file's sha256, the feature spec and the ONNX graph; a refused
        model leaves the active one in place (exit 1)."""
        from models import registry

        before = registry.active_version()
        try:
            v = registry.promote(version, reason=reason)
        except registry.RegistryError as e:
            if as_json:
                _echo_json({"ok": False, "error": str(e), "active": before})
            _fail(RuntimeError(f"{e}; {before or 'no model'} stays active"))
        if as_json:
            _echo_json({"ok": True, "from": before, "active": v})
        else:
            typer.echo(f"active: {before or '-'} -> {v}")

    @models_app.command("rollback")
    def rollback_cmd(reason: str = typer.Option("", "--reason", help="Recorded in the history."),
                     as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
        """Make the stable (last known-good) version active again."""
        from models import registry

        before = registry.active_version()
        try:
            v = registry.rollback(reason=reason)
        except registry.RegistryError as e:
            _fail(e)
        if as_json:
            _echo_json({"ok": True, "from": before, "active": v})
        else:
            typer.echo(f"active: {before or '-'} -> {v} (stable)")

    @models_app.command("verify")
    def verify_cmd(version: str | None = typer.Argument(None, help="One version (default: every one)."),
                   as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
        """Check versions as the worker loads them: every listed file's sha256, the feature spec hash, the graph.
        Exit 1 when any fails."""
        from models import registry

        try:
            vs = [registry.check_version(version)] if version else registry.versions()
        except registry.RegistryError as e:
            _fail(e)
        res: dict[str, str | None] = {}
        for v in vs:
            try:
                registry.verify_loadable(registry._root(None) / v)
                res[v] = None
            except registry.RegistryError as exc:
                res[v] = str(exc)
        if as_json:
            _echo_json({"ok": not any(res.values()), "versions": {v: {"ok": err is None, "error": err}
                                                                   for v, err in res.items()}})
        else:
            for v, err in res.items():
                typer.echo(f"{'ok  ' if err is None else 'FAIL'} {v}" + (f": {err}" if err else ""))
        if any(res.values()) or (version and not res):
            raise typer.Exit(1)


def register_retrain(app: typer.Typer) -> None:
    @app.command("retrain")
    def retrain_cmd(
        window: str = typer.Option("3d", "--window", help="Event-time window ending at the feature log's newest "
                                   "click (or --end): 3d, 36h, 90m."),
        end: str | None = typer.Option(None, "--end", help="Window end: epoch ms or ISO time (default: newest)."),
        data: Path | None = typer.Option(None, "--data", help="Train on a dataset folder (its whole span) "  # noqa: B008
                                         "instead of the topics."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Stop before promoting (the candidate is kept)."),
        force: bool = typer.Option(False, "--force", help="Redo a window already retrained."),
        model: str = typer.Option("mlp", "--model", help="mlp | dcn | logreg | heuristic"),
        sets: list[str] = typer.Option([], "--set", help="Config override key=value (models/config.py)."),  # noqa: B008
        as_json: bool = typer.Option(False, "--json", help="Print the outcome as one JSON object."),
    ) -> None:
        """Retrain from what the stream saw: data guardrails -> train -> calibrate -> model guardrails -> register
        as candidate -> promote. Once per window; exit 1 with the report when a guardrail refuses."""
        from models.calibrate import CalibrationError
        from models.retrain import parse_time, retrain

        try:
            res = retrain(window=window, data_dir=data, end_ms=parse_time(end) if end else None, cfg=_config(sets),
                          kind=model, dry_run=dry_run, force=force)
        except (ValueError, RuntimeError, CalibrationError, FileNotFoundError) as exc:
            _fail(exc)
        status = res["status"] if res["status"] != "done" else res["previous"]["status"]
        if as_json:
            _echo_json(res)
        else:
            w = res["window"]
            if res["status"] == "done":
                typer.echo(f"window {w['start']} .. {w['end']} already retrained: {status} "
                           f"{res['previous'].get('version') or ''} ({res['record']})")
            else:
                for line in (res.get("report") or {}).get("checks", []):
                    if not line["ok"]:
                        typer.secho(f"FAIL {line['kind']}.{line['name']}: {line['detail']}", fg=typer.colors.RED,
                                    err=True)
                typer.echo(f"{status}: {res.get('version') or 'no model'} (window {w['start']} .. {w['end']}"
                           + (f", report {res['record']}" if res.get("record") else "") + ")")
        if status == "refused":
            raise typer.Exit(1)


def _fmt(v: Any) -> str:
    if v is None:
        return f"{'-':>10s}"
    if isinstance(v, float):
        return f"{v:10.4f}"
    return f"{v!s:>10s}"
