"""``slidr bench NAME [--json] [--set key=value ...]``: each benchmark lives in ``bench/NAME.py``.

A benchmark module exposes ``run(**opts) -> dict`` that measures and returns its figures; this command prints
them (as one JSON object with ``--json``). Benchmarks are never timed unit tests.
"""

from __future__ import annotations

import importlib
import pkgutil

import orjson
import typer

import bench
from slidr.cliutil import parse_sets


def _available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if m.name not in ("cli", "common"))


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench_cmd(
        name: str = typer.Argument(..., help="Benchmark: " + ", ".join(_available())),
        as_json: bool = typer.Option(False, "--json", help="Print the figures as one JSON object."),
        sets: list[str] = typer.Option([], "--set", help="Benchmark option key=value (JSON values)."),  # noqa: B008
    ) -> None:
        """Run a benchmark and print what it measured."""
        if name not in _available():
            raise typer.BadParameter(f"unknown benchmark {name!r}; available: {', '.join(_available())}")
        mod = importlib.import_module(f"bench.{name}")
        figures = mod.run(**parse_sets(sets))
        if as_json:
            typer.echo(orjson.dumps(figures, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode())
        else:
            for k, v in figures.items():
                typer.echo(f"{k:40s} {v}")
