"""The ``slidr`` command. Each area registers its own subcommands; heavy imports stay inside commands."""

from __future__ import annotations

import logging

import typer

from slidr import __version__

app = typer.Typer(
    name="slidr",
    help="Real-time slice-level detection of robotic ad clicks: services, data, training, streaming.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command()
def version() -> None:
    """Print the slidr version."""
    typer.echo(__version__)


def _register_all() -> None:
    # Each module exposes register(app); they import only typer at module level.
    from bench import cli as bench_cli
    from models import cli as models_cli
    from models.data import cli as data_cli
    from slidr import services_cli
    from stream import cli as stream_cli

    for mod in (services_cli, data_cli, stream_cli, models_cli, bench_cli):
        mod.register(app)


_register_all()


def main() -> None:
    app()
