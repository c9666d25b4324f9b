"""``slidr up | down | status | topics``: the local Kafka broker and redis-server, and the topics."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer

from slidr.settings import get_settings


@contextmanager
def _clean_errors(command: str) -> Iterator[None]:
    """A ServiceError ends the command with its message and exit code 1, no traceback."""
    from slidr.services import ServiceError

    try:
        yield
    except ServiceError as e:
        typer.echo(f"slidr {command}: {e}", err=True)
        raise typer.Exit(1) from None


def register(app: typer.Typer) -> None:
    @app.command()
    def up(topics: bool = typer.Option(True, help="Also create the topics (idempotent).")) -> None:
        """Start the local Kafka broker (KRaft) and redis-server on loopback; a no-op if they run (ours, or
        another instance's that answers on the configured addresses). Secure listeners: see slidr/services.py."""
        from slidr import services

        s = get_settings()
        with _clean_errors("up"):
            services.up(s)
            if topics:
                created = services.create_topics(s)
                typer.echo(f"topics: {len(created)} created" + (f" ({', '.join(created)})" if created else ""))
            for st in services.status(s).values():
                typer.echo(st.line)

    @app.command()
    def down() -> None:
        """Stop the local services that `slidr up` started (by pid file); leaves their data and others' services."""
        from slidr import services

        with _clean_errors("down"):
            services.down(get_settings())

    @app.command()
    def status() -> None:
        """Say what runs, where, and whether this instance started it. Exit code 3 when a service is not
        running (stopped, or its port held by something that does not answer as it)."""
        from slidr import services

        with _clean_errors("status"):
            st = services.status(get_settings())
        for one in st.values():
            typer.echo(one.line)
        if not all(one.running for one in st.values()):
            raise typer.Exit(3)

    topics_app = typer.Typer(help="Kafka topics of this deployment (names and partitions: slidr/topics.py).")
    app.add_typer(topics_app, name="topics")

    @topics_app.command("create")
    def topics_create(prefix: str = typer.Option(None, help="Topic prefix (default: settings).")) -> None:
        """Create the missing topics, the worker's internal ones included (idempotent)."""
        import asyncio

        from slidr import services
        from slidr.topics import topic_specs
        from stream.app import internal_topics

        s = get_settings()
        if prefix:
            s = s.model_copy(update={"topic_prefix": prefix})
        created = asyncio.run(services.create_topics_async(s, topic_specs(s) + internal_topics(s)))
        typer.echo(f"{len(created)} created: {', '.join(created) or '-'}")

    @topics_app.command("list")
    def topics_list(prefix: str = typer.Option(None, help="Topic prefix (default: settings).")) -> None:
        """Print the topics slidr expects (data topics, then the worker's own), with partitions and purpose."""
        from slidr.topics import topic_specs
        from stream.app import internal_topics

        s = get_settings()
        if prefix:
            s = s.model_copy(update={"topic_prefix": prefix})
        for t in topic_specs(s) + internal_topics(s):
            typer.echo(f"{t.name:40s} {t.partitions:3d}  {t.purpose}")

    @app.command()
    def demo(
        work: str = typer.Option(".slidr/demo", help="Folder for the data, model, report and logs."),
        scenario: str = typer.Option("default", help="Simulator scenario (name or JSON file)."),
        seed: int = typer.Option(7, help="Simulator seed."),
        hours: float = typer.Option(1.0, help="Hours at the end of the simulated traffic to stream and score."),
        warmup_hours: float = typer.Option(24.0, help="Hours streamed before them to fill the worker's counters."),
        rate: float = typer.Option(500.0, help="Clicks/s to produce at (0: as fast as possible)."),
        fpr_budget: float = typer.Option(None, help="Overall FPR budget for calibration (default: config)."),
        keep_topics: bool = typer.Option(False, help="Keep this run's topics afterwards."),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the logs on screen too (they always go "
                                     "to WORK/demo.log)."),
    ) -> None:
        """The main job: services, simulation, training, calibration, live scoring, and a printed summary."""
        import logging
        from pathlib import Path

        from slidr.demo import run_demo

        run_demo(Path(work), scenario=scenario, seed=seed, hours=hours, warmup_hours=warmup_hours,
                 rate=rate or None, fpr_budget=fpr_budget, keep_topics=keep_topics,
                 verbose=verbose or logging.getLogger().level == logging.DEBUG)
