"""``slidr train | calibrate | evaluate | report`` (see slidr/cli.py). Heavy imports stay inside commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
        model: str = typer.Option("mlp", "--model", help="mlp | logreg | heuristic"),
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
        except (GuardrailError, FileNotFoundError, KeyError) as e:
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
    ) -> None:
        """Markdown report: curves, baselines, global vs slice calibration, archetypes, weights ablation."""
        from models.calibrate import CalibrationError
        from models.guardrails import GuardrailError
        from models.report import write_report

        try:
            path = write_report(model_dir, data_dir, out, ablation=ablation)
        except (GuardrailError, CalibrationError, FileNotFoundError) as e:
            _fail(e)
        typer.echo(f"report: {path}")


def _fmt(v: Any) -> str:
    if v is None:
        return f"{'-':>10s}"
    if isinstance(v, float):
        return f"{v:10.4f}"
    return f"{v!s:>10s}"
