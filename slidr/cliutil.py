"""Small helpers shared by the CLI areas."""

from __future__ import annotations

from typing import Any

import orjson
import typer


def parse_sets(sets: list[str]) -> dict[str, Any]:
    """``--set key=value`` options as a dict; values are JSON when they parse as JSON, else strings."""
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
