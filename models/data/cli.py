"""Subcommands of this area (see slidr/cli.py): ``simulate``, ``import talkingdata``, ``produce``."""

from __future__ import annotations

from pathlib import Path

import typer

import_app = typer.Typer(
    name="import",
    help="Import real click logs into a dataset folder (same layout as `slidr simulate` writes).",
    no_args_is_help=True,
)


@import_app.command("talkingdata")
def import_talkingdata(
    csv: Path = typer.Argument(..., exists=True, dir_okay=False, help="TalkingData AdTracking CSV "  # noqa: B008
                               "(ip,app,device,os,channel,click_time,attributed_time,is_attributed)."),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset folder to write."),  # noqa: B008
    limit: int | None = typer.Option(None, help="Read only the first N rows."),
    cpc: float = typer.Option(0.0, help="Price per click to put on every click (the data has none)."),
) -> None:
    """Turn a TalkingData AdTracking CSV into click and purchase events (a dataset folder).

    \b
    - one Click per row, sorted by click_time; click_id td-<row number> (stable)
    - one Purchase per is_attributed=1 row, at attributed_time (app download = purchase)
    - visitor key ip/device/os as session_id; never logged in; no user agent
    - ip code -> synthetic IPv4 10.0.0.0 + code
    - platform: device 1,2 -> app; device 0 -> desktop; other devices -> mobile
    - app -> advertiser_id = campaign_id app-<app>; ad_id app-<app>.ch-<channel>; placement ch-<channel>
    - same layout as `slidr simulate` writes, without truth.jsonl
    """
    from models.data.talkingdata import import_talkingdata as run

    meta = run(csv, out, limit=limit, cpc=cpc)
    c = meta["counts"]
    typer.echo(f"wrote {out}: {c['clicks']} clicks, {c['purchases']} purchases "
               f"(slices: {meta['slice_counts']})")


@import_app.command("table")
def import_table(
    files: list[Path] = typer.Argument(..., exists=True, dir_okay=False, help="Click logs: CSV, TSV, JSON lines "  # noqa: B008
                                       "(.jsonl) or Parquet; several files are read in the order given."),
    mapping: str = typer.Option(..., "--map", "-m", help="How rows become clicks: key=value pairs "
                                "(click_id=ID,ts=TIME,...) or a .toml/.json file (models/data/table.py)."),
    purchases: list[Path] = typer.Option([], "--purchases", exists=True, dir_okay=False,  # noqa: B008
                                         help="Purchase (conversion) logs, attributed to clicks by click id."),
    purchases_map: str = typer.Option("", "--purchases-map", help="Mapping of the purchase files "
                                      "(purchase_id=...,click_id=...,ts=...; optional customer_id, amount)."),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset folder to write."),  # noqa: B008
    limit: int | None = typer.Option(None, help="Read only the first N click rows."),
) -> None:
    """Import your own click logs with your own column names into a dataset folder.

    \b
    Mapping values: a column name (ts=event_time), a template (session_id={ip}/{device}; {_row} is the row
    number), or a constant (advertiser_id==acme). Options: ts_format (auto, epoch_s, epoch_ms, iso, or a
    strftime format), ip_int_base, platform_rule (file only), purchase_flag + purchase_ts (purchases in the
    click rows). Rows that cannot be imported are listed with their reason in DIR/rejects.jsonl.
    Example (TalkingData): --map models/data/mappings/talkingdata.toml
    """
    from models.data.table import MappingError, import_table, parse_mapping

    try:
        meta = import_table(files, out, parse_mapping(mapping), purchases=purchases,
                            purchase_mapping=parse_mapping(purchases_map), limit=limit)
    except MappingError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    c, rej = meta["counts"], meta["rejected"]
    typer.echo(f"wrote {out}: {c['clicks']} clicks, {c['purchases']} purchases (slices: {meta['slice_counts']})")
    if rej["rows"]:
        typer.echo(f"rejected {rej['rows']} rows (listed in {out / 'rejects.jsonl'}):")
        for reason, n in rej["reasons"].items():
            typer.echo(f"  {n:8d}  {reason}")
    else:
        typer.echo("rejected 0 rows")


def register(app: typer.Typer) -> None:
    """Add this area's commands to the ``slidr`` app."""

    @app.command("simulate")
    def simulate_cmd(
        scenario: str = typer.Option("default", "--scenario", "-s",
                                     help="Built-in scenario name (default, small, large, clean, heavy-bots) "
                                          "or a JSON scenario file."),
        seed: int = typer.Option(0, "--seed", help="Random seed: same seed and scenario = byte-identical output."),
        out: Path = typer.Option(..., "--out", "-o", help="Dataset folder to write."),  # noqa: B008
        clicks: int | None = typer.Option(None, "--clicks", help="Override the scenario's click volume."),
        days: float | None = typer.Option(None, "--days", help="Override the scenario's number of days."),
        audit: bool = typer.Option(False, "--audit", help="Realism audit: per archetype and field, how well the "
                                   "field alone separates it from humans (writes audit.json, prints the table)."),
    ) -> None:
        """Simulate ad-click traffic (humans + bot archetypes) with ground truth into a dataset folder."""
        import time

        from models.data.simulate import simulate_to

        t = time.perf_counter()
        sim = simulate_to(out, scenario, seed, clicks=clicks, days=days)
        m = sim.meta
        typer.echo(f"wrote {out} in {time.perf_counter() - t:.1f} s: {m['counts']['clicks']} clicks "
                   f"({int(sim.is_bot.sum())} bots), {m['counts']['purchases']} purchases, "
                   f"{m['counts']['customers']} customers")
        typer.echo("bot share per slice: " + ", ".join(f"{k} {v:.3f}" for k, v in m["bot_share"].items()))
        if audit:
            import orjson

            from models.data.audit import audit_folder, to_markdown

            res = audit_folder(out)
            (out / "audit.json").write_bytes(orjson.dumps(res, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
            typer.echo(to_markdown(res))

    app.add_typer(import_app, name="import")

    @app.command("produce")
    def produce_cmd(
        data: Path = typer.Argument(..., exists=True, file_okay=False, help="Dataset folder."),  # noqa: B008
        rate: float | None = typer.Option(None, "--rate", help="Target clicks per second (default: as fast "
                                                               "as possible)."),
        limit: int | None = typer.Option(None, "--limit", help="Send at most N clicks (and their purchases)."),
        prefix: str | None = typer.Option(None, "--prefix", help="Topic prefix (default: settings)."),
        restart: bool = typer.Option(False, "--restart", help="Ignore the checkpoint and send from the start."),
        no_purchases: bool = typer.Option(False, "--no-purchases", help="Send clicks only."),
    ) -> None:
        """Send a dataset's clicks and purchases to Kafka in event-time order (resumable; Ctrl-C is safe)."""
        import asyncio

        from models.data.produce import produce

        res = asyncio.run(produce(data, rate=rate, limit=limit, prefix=prefix, restart=restart,
                                  purchases=not no_purchases, progress=True))
        typer.echo(f"sent {res.clicks} clicks and {res.purchases} purchases in {res.seconds:.1f} s "
                   f"({res.clicks_per_s:,.0f} clicks/s); {res.acked_total} records acknowledged in all"
                   + (" (interrupted: run again to resume)" if res.interrupted else ""))
