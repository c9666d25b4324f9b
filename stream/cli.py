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

    replay_app = typer.Typer(help="Re-decide a range of clicks and publish corrected decisions (see `slidr replay "
                             "--help`; `slidr replay list`).", invoke_without_command=True)
    app.add_typer(replay_app, name="replay")

    @replay_app.callback()
    def replay_cmd(
        ctx: typer.Context,
        frm: Annotated[str | None, typer.Option("--from", help="Start: p:o[,p:o] clicks offsets, epoch ms or ISO "
                                                "8601 time (offsets-for-times on the records' timestamps).")] = None,
        to: Annotated[str | None, typer.Option("--to", help="End (exclusive), in the same forms.")] = None,
        model: Annotated[str | None, typer.Option(help="Model version (default: the registry's STABLE).")] = None,
        mode: Annotated[str, typer.Option(help="rescore (feature log) or recompute (replay agent).")] = "rescore",
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Count the flips per slice and advertiser with "
                                              "the spend that moves; publish nothing.")] = False,
        send_all: Annotated[bool, typer.Option("--all", help="Re-send unchanged decisions too.")] = False,
        restart: Annotated[bool, typer.Option("--restart", help="Ignore this replay's checkpoint.")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    ) -> None:
        """Re-decide the clicks of a range with a model (default: the stable one), by rescoring the feature log
        or recomputing the features, and publish a decision with revision + 1 and the replay id for each click
        whose decision changes. Safe to interrupt: running the same replay again resumes it."""
        if ctx.invoked_subcommand is not None:
            return
        if frm is None or to is None:
            raise typer.BadParameter("--from and --to are required (or `slidr replay list`)")
        import orjson
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        from slidr.settings import get_settings
        from stream import replay as r

        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeRemainingColumn(), transient=True, disable=as_json) as bar:
            tasks: dict[str, object] = {}

            def progress(phase: str, done: int, total: int) -> None:
                if phase not in tasks:
                    tasks[phase] = bar.add_task(phase, total=total)
                bar.update(tasks[phase], completed=done, total=total)  # type: ignore[arg-type]

            try:
                res = r.replay(get_settings(), frm, to, model=model, mode=mode, dry_run=dry_run, send_all=send_all,
                               progress=progress, restart=restart)
            except r.ReplayError as e:
                typer.echo(f"replay refused: {e}", err=True)
                raise typer.Exit(2) from None
            except KeyboardInterrupt:
                typer.echo("replay interrupted: what was published is checkpointed; run the same command again "
                           "to resume", err=True)
                raise typer.Exit(130) from None
        if as_json:
            typer.echo(orjson.dumps(res.to_json(), option=orjson.OPT_INDENT_2).decode())
            return
        for line in r.summary_lines(res):
            typer.echo(line)
        if res.tally.rows:
            Console().print(r.flips_table(res))

    @replay_app.command("list")
    def replay_list(as_json: bool = typer.Option(False, "--json", help="Print JSON lines.")) -> None:
        """Every replay run: who, when, range, model, mode, status and counts."""
        import orjson
        from rich.console import Console
        from rich.table import Table

        from slidr.settings import get_settings
        from stream import replay as r

        recs = r.records(get_settings())
        if as_json:
            for rec in recs:
                typer.echo(orjson.dumps(rec).decode())
            return
        t = Table(title=f"{len(recs)} replay runs")
        for col in ("replay id", "started", "by", "mode", "model", "range", "status", "published", "credited",
                    "re-billed"):
            t.add_column(col)
        for rec in recs:
            c = rec.get("counts", {})
            rng = rec.get("range", {})
            span = ", ".join(f"{p}:{o}-{rng['end'].get(p)}" for p, o in rng.get("start", {}).items())
            t.add_row(rec["replay_id"], rec.get("started", ""), rec.get("by", ""), rec.get("mode", ""),
                      rec.get("model", ""), span, rec.get("status", "") + (" (dry run)" if rec.get("dry_run") else ""),
                      str(c.get("published", 0)), f"{c.get('credited', 0):.2f}", f"{c.get('rebilled', 0):.2f}")
        Console().print(t)

    @app.command("replay-agent", hidden=True)
    def replay_agent(
        replay_id: Annotated[str, typer.Argument(help="The replay's id.")],
        model_dir: Annotated[Path, typer.Option(help="Model folder.")],
    ) -> None:
        """The Faust app of a recompute replay (started by `slidr replay --mode recompute`)."""
        from slidr.settings import get_settings
        from stream import replay as r

        r.run_agent(get_settings(), replay_id, model_dir)

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
