"""The ``orchestrator-kafka`` repair commands: ``retry`` and ``skip`` (``cancel --force`` is the cancel
command's). Each sends a ``saga.repair`` request through :class:`~.client.SagaClient`; the orchestrator
that owns the saga applies it and records it in the saga's audit (:mod:`.repair`)."""

from __future__ import annotations

import click

from .cli_support import client, run

_REQUEST_ID = click.option(
    "--request-id", metavar="ID", help="The request's id: sending it again with the same id applies it once."
)


@click.command()
@click.argument("transaction_id")
@click.option("--step", help="Only this step.")
@click.option("--reason", help="Recorded in the audit.")
@_REQUEST_ID
def retry(transaction_id: str, step: str | None, reason: str | None, request_id: str | None) -> None:
    """Retry a saga: a failed saga's failed compensations run again and its rollback goes on; a stuck
    saga's awaited commands are sent again, and its attempts waiting to be retried are sent now."""

    @run
    async def main() -> str:
        async with client() as saga_client:
            return await saga_client.retry(transaction_id, step=step, reason=reason, request_id=request_id)

    click.echo(f"retry requested for {transaction_id} (request {main()})")


@click.command()
@click.argument("transaction_id")
@click.argument("step")
@click.option("--reason", required=True, help="Why it may be skipped (e.g. undone by hand); audited.")
@_REQUEST_ID
def skip(transaction_id: str, step: str, reason: str, request_id: str | None) -> None:
    """Count STEP's failed or stuck compensation as done by hand; the saga's rollback goes on."""

    @run
    async def main() -> str:
        async with client() as saga_client:
            return await saga_client.skip_compensation(transaction_id, step, reason, request_id=request_id)

    click.echo(f"skip of the compensation of {step} requested for {transaction_id} (request {main()})")
