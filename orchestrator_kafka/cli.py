"""The ``orchestrator-kafka`` command line."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="orchestrator-kafka")
def cli() -> None:
    """A saga orchestrator on Apache Kafka and Redis."""


@cli.command()
def demo() -> None:
    """Run the order-processing demo in one process, on the in-memory backend."""
    from .demo import main as run

    run()


def main() -> None:
    """The console script's entry point."""
    cli()
