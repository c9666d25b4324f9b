"""Subcommands of this area (see slidr/cli.py): worker, health, monitor, cache load, billing tail|summary."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the ``slidr`` app."""

    @app.command("worker")
    def worker(
        model: Annotated[Path | None, typer.Option(help="Model folder (default: the registry's ACTIVE one).")] = None,
        data_dir: Annotated[Path | None, typer.Option(help="Faust state folder (default: HOME/faust/ID).")] = None,
        loglevel: Annotated[str, typer.Option(help="Faust log level.")] = "info",
    ) -> None:
        """Run a detector worker (several workers with the same SLIDR_WORKER_ID share the partitions)."""
        from slidr.settings import get_settings
        from stream.app import run_worker

        run_worker(get_settings(), model_dir=model, data_dir=data_dir, loglevel=loglevel)

    @app.command("health")
    def health(
        url: Annotated[str | None, typer.Option(help="The worker's /metrics (default: 127.0.0.1:SLIDR_METRICS_PORT).")]
        = None,
    ) -> None:
        """Exit 0 when the worker's own health verdict is healthy and fresh, 1 otherwise (the images' HEALTHCHECK;
        the checks: stream/health.py)."""
        from slidr.settings import get_settings
        from stream.health import probe

        if url is None:
            port = get_settings().metrics_port
            if not port:
                typer.echo("SLIDR_METRICS_PORT is 0: the worker serves no verdict", err=True)
                raise typer.Exit(1)
            url = f"http://127.0.0.1:{port}/metrics"
        ok, why = probe(url)
        typer.echo(why)
        raise typer.Exit(0 if ok else 1)

    @app.command("monitor")
    def monitor() -> None:
        """Live IVR / FPR per slice from the decisions and purchases topics; rolls back to the stable model
        when the active one departs sharply from its calibration (thresholds: SLIDR_MONITOR_*)."""
        from slidr.settings import get_settings
        from stream.monitor import run_monitor

        run_monitor(get_settings())

    cache = typer.Typer(help="Redis profile cache.", no_args_is_help=True)
    app.add_typer(cache, name="cache")

    @cache.command("load")
    def cache_load(
        folder: Annotated[Path, typer.Argument(help="Dataset folder with customers.jsonl / ip_ranges.jsonl.")],
    ) -> None:
        """Load customer profiles and IP-range flags into Redis (pipelined)."""
        from slidr.settings import get_settings
        from stream import cache as c

        n = c.load(get_settings(), c.profiles_from_dir(folder))
        typer.echo(f"loaded {n} profile keys")

    billing = typer.Typer(help="Reference billing consumer of the decisions topic.", no_args_is_help=True)
    app.add_typer(billing, name="billing")

    @billing.command("summary")
    def billing_summary(
        idle_s: float = typer.Option(3.0, help="Stop after this many seconds without new decisions."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Read every decision so far; print billable vs invalidated clicks and spend per advertiser."""
        from slidr.settings import get_settings
        from stream import billing as b

        b.print_summary(b.read_all(get_settings(), idle_s=idle_s), as_json=as_json)

    @billing.command("tail")
    def billing_tail(
        every_s: float = typer.Option(5.0, help="Seconds between summaries."),
        from_start: bool = typer.Option(True, help="Start at the beginning of the topic."),
    ) -> None:
        """Follow the decisions topic, printing the per-advertiser summary every few seconds."""
        from slidr.settings import get_settings
        from stream import billing as b

        b.tail(get_settings(), every_s=every_s, from_start=from_start)
