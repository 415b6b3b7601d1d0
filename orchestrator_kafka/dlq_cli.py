"""The ``orchestrator-kafka dlq`` commands: list the dead letters, and send chosen ones back to where they
came from (:mod:`.redrive`)."""

from __future__ import annotations

from typing import Any

import click
import orjson
from rich.console import Console

from . import render
from .cli_support import client, run
from .redrive import Redrive


@click.group()
def dlq() -> None:
    """Read the dead-letter topic and send dead letters back (redrive)."""


@dlq.command(name="list")
@click.option("--reason", help="Only dead letters with this reason.")
@click.option("--id", "transaction_id", metavar="TX", help="Only this saga's dead letters (by key).")
@click.option("--pending", is_flag=True, help="Only those no redrive has sent back.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines, one dead letter each.")
def dlq_list(reason: str | None, transaction_id: str | None, pending: bool, as_json: bool) -> None:
    """List the dead letters: position on the topic, key, reason, source, and whether sent back."""

    @run
    async def main() -> list[dict[str, Any]]:
        async with client(store=False) as saga_client:
            letters = await saga_client.dead_letters(reason=reason, transaction_id=transaction_id)
        return [letter.to_dict() for letter in letters if not (pending and letter.redriven_by)]

    found = main()
    if as_json:
        for letter in found:
            click.echo(orjson.dumps(letter).decode())
    else:
        Console(highlight=False, soft_wrap=True).print(render.dead_letters_table(found))


@dlq.command()
@click.option(
    "--position", "positions", multiple=True, metavar="P:O", help="A dead letter's position (repeat)."
)
@click.option("--reason", help="The dead letters with this reason.")
@click.option("--id", "transaction_id", metavar="TX", help="The dead letters of this saga (by key).")
@click.option("--request-id", help="An id for this redrive, recorded on what it sends (default: random).")
@click.option("--dry-run", is_flag=True, help="Only say what would be sent back.")
def redrive(
    positions: tuple[str, ...],
    reason: str | None,
    transaction_id: str | None,
    request_id: str | None,
    dry_run: bool,
) -> None:
    """Send the dead letters matching every option given back to the topics they came from, each once."""

    @run
    async def main() -> Redrive:
        async with client(store=False) as saga_client:
            return await saga_client.redrive(
                positions=positions,
                reason=reason,
                transaction_id=transaction_id,
                request_id=request_id,
                dry_run=dry_run,
            )

    report = main()
    verb = "would send back" if dry_run else "sent back"
    for letter in report.redriven:
        click.echo(f"{verb} {letter.position} ({letter.reason}) to {letter.source_topic}")
    for letter, why in report.refused:
        click.echo(f"refused {letter.position} ({letter.reason}): {why}", err=True)
    click.echo(f"redrive {report.request_id}: {len(report.redriven)} {verb}, {len(report.refused)} refused")
