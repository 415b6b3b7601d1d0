"""Rich terminal rendering of sagas and audit events, for the demo and the CLI. No I/O of its own."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.markup import escape
from rich.table import Table

from .models import RETRY_ACTIONS, AuditActionName, SagaEvent

STATE_STYLE = {
    "pending": "white",
    "running": "cyan",
    "compensating": "yellow",
    "completed": "bold green",
    "compensated": "bold yellow",
    "failed": "bold red",
    "cancelled": "magenta",
}


# The actions shown with the state they leave the saga in: it starts, rolls back or ends.
_STATE_ACTIONS = frozenset(
    {
        AuditActionName.SAGA_CREATED,
        AuditActionName.SAGA_STARTED,
        AuditActionName.COMPENSATION_STARTED,
        AuditActionName.SAGA_COMPLETED,
        AuditActionName.SAGA_COMPENSATED,
        AuditActionName.SAGA_CANCELLED,
        AuditActionName.SAGA_FAILED,
    }
)


def state(name: str | None) -> str:
    """``name`` in its state's colour, as rich markup."""
    if name is None:
        return "[dim]new[/dim]"
    return f"[{STATE_STYLE.get(name, 'white')}]{escape(name)}[/]"


def describe(event: SagaEvent) -> list[str]:
    """Readable lines for an audit event: one per action of the transition."""
    lines = []
    for a in event.body.actions:
        what = a.action.replace("_", " ")
        step = f" [bold]{escape(a.step)}[/bold]" if a.step else ""
        if a.worker_name and a.kind == "compensate":
            step += f" -> {escape(a.worker_name)}"
        attempt = f" (attempt {a.attempt})" if a.attempt and a.attempt > 1 else ""
        shown = f"  {state(a.state)}" if a.action in _STATE_ACTIONS else ""
        # A retry's error is the failure's, shown on the action before it already.
        error = f"  [red]{escape(a.error)}[/red]" if a.error and a.action not in RETRY_ACTIONS else ""
        lines.append(f"[dim]{escape(event.transaction_id):>10}[/dim]  {what}{step}{attempt}{shown}{error}")
    return lines


def transition(event: SagaEvent) -> str:
    """One line per transition for ``tail``: time, saga, workflow, states before and after, actions."""
    body = event.body
    at = event.occurred_at.strftime("%H:%M:%S.%f")[:-3]
    head = (
        f"[dim]{at}[/dim] [bold]{escape(event.transaction_id)}[/bold] [dim]{escape(event.workflow_id)}"
        f" v{body.version}[/dim] {state(body.from_state)} -> {state(body.to_state)}"
    )
    parts = []
    for a in body.actions:
        text = a.action.value
        if a.step:
            text += f" {a.step}"
            if a.attempt and a.attempt > 1:
                text += f"#{a.attempt}"
        if a.error:
            text += f" ({a.error})"
        parts.append(escape(text))
    return f"{head}  {'; '.join(parts)}"


def status_table(status: Mapping[str, Any]) -> Table:
    """``Orchestrator.get_status``'s dict as a two-column table, steps included."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key in (
        "transaction_id",
        "workflow_id",
        "state",
        "current_step",
        "version",
        "workflow_version",
        "run_id",
        "created_at",
        "updated_at",
    ):
        value = status.get(key)
        if key in ("workflow_version", "run_id") and not value:
            continue  # a saga stored before versions and runs has neither
        table.add_row(key, state(value) if key == "state" else escape(str(value)))
    if status.get("error"):
        table.add_row("error", f"[red]{escape(str(status['error']))}[/red]")
    if status.get("parked"):
        table.add_row("parked", f"[yellow]{escape(str(status['parked']))}[/yellow]")
    results = status.get("step_results", {})
    for name, step_state in status.get("steps", {}).items():
        result = f"  {escape(str(results[name]))}" if name in results else ""
        table.add_row(f"  {escape(name)}", f"{escape(step_state)}{result}")
    for late in status.get("late_compensations", []):
        settled = "[red]failed[/red]" if late["failed"] else "pending"
        error = f"  [red]{escape(str(late['error']))}[/red]" if late["error"] else ""
        table.add_row(f"  {escape(late['step'])} (late)", f"{settled}, attempt {late['attempt']}{error}")
    return table


def versions_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    """The sagas in flight by workflow and version (of ``SagaClient.versions_in_flight``)."""
    table = Table(title="sagas in flight, by workflow version", title_justify="left")
    for column in ("workflow", "version", "in flight", "parked"):
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(
            escape(row["workflow_id"]),
            escape(row["workflow_version"] or "(none recorded)"),
            str(row["in_flight"]),
            f"[yellow]{row['parked']}[/yellow]" if row["parked"] else "0",
        )
    return table


def sagas_table(statuses: Sequence[Mapping[str, Any]]) -> Table:
    """One row per saga: id, workflow, state, current step, last update, error."""
    table = Table(title=f"{len(statuses)} sagas", title_justify="left")
    for column in ("transaction id", "workflow", "state"):
        table.add_column(column, no_wrap=True)
    for column in ("step", "updated", "error"):
        table.add_column(column, overflow="fold")
    for s in statuses:
        table.add_row(
            escape(s["transaction_id"]),
            escape(s["workflow_id"]),
            state(s["state"]),
            escape(s.get("current_step") or ""),
            escape(s["updated_at"][:19]),
            f"[red]{escape(s['error'])}[/red]" if s.get("error") else "",
        )
    return table


def dead_letters_table(letters: Sequence[Mapping[str, Any]]) -> Table:
    """One row per dead letter (as ``DeadLetter.to_dict`` gives it): where it is, its key, why, where it
    came from, whether a redrive sent it back."""
    table = Table(title=f"{len(letters)} dead letters", title_justify="left")
    for column in ("position", "key", "reason", "source"):
        table.add_column(column, no_wrap=True)
    for column in ("redriven", "detail"):
        table.add_column(column, overflow="fold")
    for letter in letters:
        source = f"{letter['source_topic']}[{letter['source_partition']}]@{letter['source_offset']}"
        redriven = letter["redriven_by"]
        table.add_row(
            letter["position"],
            escape(letter["key"]),
            f"[red]{escape(letter['reason'])}[/red]",
            escape(source),
            f"[green]by {escape(redriven)}[/green]" if redriven else "",
            escape(letter["detail"]),
        )
    return table
