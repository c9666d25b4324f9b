"""``slidr bench NAME [--json] [--set key=value ...]``: each benchmark lives in ``bench/NAME.py``.

A benchmark module exposes ``run(**opts) -> dict`` that measures and returns its figures; this command prints
them (as one JSON object with ``--json``). Benchmarks are never timed unit tests.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import orjson
import typer

import bench


def _available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if m.name not in ("cli", "common"))


def _parse(sets: list[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for item in sets:
        key, sep, val = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set expects key=value, got {item!r}")
        try:
            opts[key.replace("-", "_")] = orjson.loads(val)
        except orjson.JSONDecodeError:
            opts[key.replace("-", "_")] = val
    return opts


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
        figures = mod.run(**_parse(sets))
        if as_json:
            typer.echo(orjson.dumps(figures, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode())
        else:
            for k, v in figures.items():
                typer.echo(f"{k:40s} {v}")
