"""The ``orchestrator-kafka`` command line: run the services, start, inspect, cancel, repair and audit sagas.

Settings come from the environment (:mod:`settings` names the variables) and the group's flags, which
win. A service that cannot be reached or a saga that does not exist is one line on stderr and exit
status 1, not a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click
import orjson
from rich.console import Console

from . import codec, render
from .checks import check_context
from .cli_support import client as _client
from .cli_support import fail as _fail
from .cli_support import run as _run
from .cli_support import settings as _settings
from .constants import Topics
from .context import WorkflowState
from .dlq_cli import dlq
from .errors import DecodeError, OrchestratorError
from .graph import mermaid
from .loading import load_handlers, load_workflows
from .models import SagaEvent
from .repair_cli import retry, skip
from .settings import ENV_VARS, Settings, parse_min_replicas, parse_retention

P = ParamSpec("P")
T = TypeVar("T")
_STATES = [s.value for s in WorkflowState]
_NOT_TAKEN_AFTER = 10.0  # seconds start --wait waits for an orchestrator to record the saga


def _context_arg(value: str) -> dict[str, Any]:
    """``--context``: JSON text, or ``@path`` to a JSON file, or ``@-`` for stdin."""
    if value.startswith("@"):
        path = value[1:]
        try:
            value = sys.stdin.read() if path == "-" else Path(path).read_text()
        except OSError as exc:
            raise click.BadParameter(f"cannot read {path!r}: {exc.strerror}") from None
    try:
        return check_context(orjson.loads(value))
    except orjson.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}") from None
    except OrchestratorError as exc:
        raise click.BadParameter(str(exc)) from None


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,  # replaces the silencing handler the group installs
    )
    from .service import RepeatFilter

    for handler in logging.getLogger().handlers:
        handler.addFilter(RepeatFilter())


# ---------------------------------------------------------------- the group


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="orchestrator-kafka")
@click.option(
    "--bootstrap-servers", metavar="HOST:PORT", help=f"Kafka brokers [env {ENV_VARS['bootstrap_servers']}]."
)
@click.option(
    "--redis-url",
    metavar="URL[,URL...]",
    help=f"Redis, or start-up nodes of a Redis Cluster, comma-separated [env {ENV_VARS['redis_url']}].",
)
@click.option("--topic-prefix", metavar="PREFIX", help=f"Topic name prefix [env {ENV_VARS['topic_prefix']}].")
@click.option("--key-prefix", metavar="PREFIX", help=f"Redis key prefix [env {ENV_VARS['key_prefix']}].")
@click.option(
    "--replication-factor",
    type=click.IntRange(min=1),
    metavar="N",
    help="Replicas of each topic created (default min(3, brokers); from 3 on, min.insync.replicas=2)"
    f" [env {ENV_VARS['replication_factor']}].",
)
@click.option(
    "--retention",
    metavar="SECONDS|none",
    help=f"Keep an ended saga this long (default 7 days) [env {ENV_VARS['retention']}].",
)
@click.option(
    "--failed-retention",
    metavar="SECONDS|none",
    help=f"Keep a failed saga this long (default 30 days) [env {ENV_VARS['failed_retention']}].",
)
@click.option(
    "--min-replicas",
    metavar="N|auto",
    help="Redis replicas each write waits for (default auto: 1 when every primary has one, else 0) "
    f"[env {ENV_VARS['min_replicas']}].",
)
@click.pass_context
def cli(
    ctx: click.Context,
    bootstrap_servers: str | None,
    redis_url: str | None,
    topic_prefix: str | None,
    key_prefix: str | None,
    replication_factor: int | None,
    retention: str | None,
    failed_retention: str | None,
    min_replicas: str | None,
) -> None:
    """A saga orchestrator on Apache Kafka and Redis.

    Settings come from the environment variables named in each option's help; the options win.
    """
    # The client libraries' own log lines would repeat, above it, the one-line error a command ends
    # with; the services (run, worker) set logging up for real.
    logging.getLogger().addHandler(logging.NullHandler())
    try:
        settings = Settings.from_env()
        overrides: dict[str, object] = {
            "bootstrap_servers": bootstrap_servers,
            "redis_url": redis_url,
            "topic_prefix": topic_prefix,
            "key_prefix": key_prefix,
            "replication_factor": replication_factor,
        }
        overrides = {k: v for k, v in overrides.items() if v}
        for name, raw in (("retention", retention), ("failed_retention", failed_retention)):
            if raw is not None:
                overrides[name] = parse_retention("--" + name.replace("_", "-"), raw)
        if min_replicas is not None:
            overrides["min_replicas"] = parse_min_replicas("--min-replicas", min_replicas)
    except OrchestratorError as exc:
        raise _fail(str(exc)) from None
    ctx.obj = Settings(**{**_as_dict(settings), **overrides})


def _as_dict(settings: Settings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in ENV_VARS}


# ---------------------------------------------------------------- services


_health_port = click.option(
    "--health-port",
    type=int,
    help=f"Serve /healthz and /readyz on this port [env {ENV_VARS['health_port']}].",
)
_health_host = click.option(
    "--health-host", default="0.0.0.0", show_default=True, help="Address the health endpoints bind."
)


def _health(port: int | None, host: str) -> tuple[str, int] | None:
    port = port if port is not None else _settings().health_port
    return (host, port) if port is not None else None


@cli.command()
@click.option("--workflows", "spec", required=True, metavar="MODULE[:ATTR]", help="Where the workflows are.")
@_health_port
@_health_host
def run(spec: str, health_port: int | None, health_host: str) -> None:
    """Run an orchestrator for the workflows a module defines, until SIGTERM."""
    from .orchestrator import Orchestrator
    from .service import serve
    from .telemetry import configure

    settings = _settings()
    _configure_logging(settings.log_level)
    workflows = load_workflows(spec)
    health = _health(health_port, health_host)

    @_run
    async def main() -> None:
        configure("orchestrator-kafka")
        bus, store = settings.event_bus(), settings.state_store()
        orchestrator = Orchestrator(workflows, bus, store)
        await serve(orchestrator, closers=[bus.stop, store.close], health=health)

    main()


@cli.command()
@click.option("--handlers", "spec", required=True, metavar="MODULE[:ATTR]", help="Where the handlers are.")
@click.option("--concurrency", default=64, show_default=True, help="Handlers run at once, per worker name.")
@click.option(
    "--grace",
    default=30.0,
    show_default=True,
    help="Seconds the handlers running get to finish on a rebalance or SIGTERM.",
)
@_health_port
@_health_host
def worker(spec: str, concurrency: int, grace: float, health_port: int | None, health_host: str) -> None:
    """Run the step handlers a module defines, until SIGTERM."""
    from .service import serve
    from .telemetry import configure
    from .worker import Worker

    settings = _settings()
    _configure_logging(settings.log_level)
    handlers = load_handlers(spec)
    health = _health(health_port, health_host)

    @_run
    async def main() -> None:
        configure("orchestrator-kafka-worker")
        bus = settings.event_bus()
        the_worker = Worker(bus, concurrency=concurrency, grace=grace)
        for name, fn in handlers.items():
            the_worker.register(name, fn)
        await serve(the_worker, closers=[bus.stop], health=health)

    main()


# ---------------------------------------------------------------- sagas


@cli.command()
@click.argument("workflow")
@click.option("--context", "context", default="{}", metavar="JSON|@FILE", help="The saga's initial data.")
@click.option("--id", "transaction_id", metavar="TX", help="The transaction id (an idempotency key).")
@click.option("--wait", is_flag=True, help="Wait for the saga to end; exit 1 unless it completed.")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds --wait waits.")
def start(workflow: str, context: str, transaction_id: str | None, wait: bool, timeout: float) -> None:
    """Ask for a saga of WORKFLOW: publish a start request; print its transaction id."""
    data = _context_arg(context)
    console = Console(highlight=False)

    @_run
    async def main() -> dict[str, Any] | None:
        async with _client(store=wait) as client:
            tx = await client.start_saga(workflow, data, transaction_id=transaction_id)
            click.echo(tx)
            if not wait:
                return None
            # Served by one watch of the audit topic, not by polling the saga.
            waiting = asyncio.ensure_future(client.wait_for(tx, timeout))
            try:
                done, _ = await asyncio.wait({waiting}, timeout=min(timeout, _NOT_TAKEN_AFTER))
                if not done:
                    try:
                        await client.get_status(tx)
                    except ValueError:  # not taken by an orchestrator yet
                        raise _fail(
                            f"no orchestrator took {tx} within {_NOT_TAKEN_AFTER:g}s: is one running for"
                            f" {workflow!r}? (a start for an unknown workflow goes to the dead-letter"
                            " topic)"
                        ) from None
                return await waiting
            finally:
                waiting.cancel()
                await client.close()

    try:
        status = main()
    except TimeoutError:
        raise _fail(f"the saga did not end within {timeout:g}s") from None
    if status is not None:
        console.print(render.status_table(status))
        if status["state"] != "completed":
            sys.exit(1)


@cli.command()
@click.argument("transaction_id")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(transaction_id: str, as_json: bool) -> None:
    """Show a saga: its state, steps, results and error."""

    @_run
    async def main() -> dict[str, Any]:
        async with _client(bus=False) as client:
            return await client.get_status(transaction_id)

    found = main()
    if as_json:
        click.echo(orjson.dumps(found, option=orjson.OPT_INDENT_2).decode())
    else:
        Console(highlight=False).print(render.status_table(found))


@cli.command(name="list")
@click.option("--workflow", help="Only this workflow's sagas.")
@click.option("--state", type=click.Choice(_STATES), help="Only sagas in this state.")
@click.option(
    "--limit", default=100, show_default=True, type=click.IntRange(1, 10_000), help="Sagas per page."
)
@click.option("--cursor", help="Start after the page that printed this cursor.")
@click.option(
    "--since",
    metavar="AGE|TIME",
    help="Only sagas whose state changed since then: an age (90s, 30m, 12h, 7d) or an ISO 8601 time.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines, one status per saga.")
def list_(
    workflow: str | None, state: str | None, limit: int, cursor: str | None, since: str | None, as_json: bool
) -> None:
    """List sagas, a page at a time, oldest state change first. The next page's cursor goes to stderr."""
    try:
        after = None if since is None else _since(since)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None

    @_run
    async def main() -> tuple[list[dict[str, Any]], str | None]:
        async with _client(bus=False) as client:
            return await client.list_sagas(workflow, state, limit=limit, cursor=cursor, updated_after=after)

    found, next_cursor = main()
    if as_json:
        for s in found:
            click.echo(orjson.dumps(s).decode())
    else:
        Console(highlight=False).print(render.sagas_table(found))
    if next_cursor is not None:
        click.echo(f"more: --cursor {next_cursor}", err=True)


_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _since(text: str) -> datetime:
    """The time ``--since`` names: now less an age like ``30m``, or an ISO 8601 time (UTC if it names no
    zone)."""
    unit = _AGE_UNITS.get(text[-1:].lower())
    if unit is not None and text[:-1].isdigit():
        return datetime.now(UTC) - timedelta(seconds=int(text[:-1]) * unit)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither an age (90s, 30m, 12h, 7d) nor an ISO 8601 time") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@cli.command()
@click.option("--workflow", help="Only this workflow's sagas.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines, one per workflow version.")
def versions(workflow: str | None, as_json: bool) -> None:
    """Count the sagas in flight by workflow and version: a version none runs on can be dropped."""

    @_run
    async def main() -> list[dict[str, Any]]:
        async with _client(bus=False) as client:
            return await client.versions_in_flight(workflow)

    rows = main()
    if as_json:
        for row in rows:
            click.echo(orjson.dumps(row).decode())
    else:
        Console(highlight=False).print(render.versions_table(rows))


@cli.command()
@click.argument("transaction_id")
@click.option("--reason", help="Recorded with the request.")
@click.option(
    "--force",
    is_flag=True,
    help="Also a saga stuck compensating: stop waiting for its steps in flight and compensate them.",
)
def cancel(transaction_id: str, reason: str | None, force: bool) -> None:
    """Cancel a pending or running saga: its steps are compensated, then it ends cancelled."""

    @_run
    async def main() -> None:
        async with _client() as client:
            if force:
                await client.force_cancel(transaction_id, reason)
            else:
                await client.cancel_saga(transaction_id, reason)

    main()
    click.echo(f"{'force-' if force else ''}cancel requested for {transaction_id}")


@cli.command()
@click.option("--follow", "-f", is_flag=True, help="Keep printing new transitions as they happen.")
@click.option("--json", "as_json", is_flag=True, help="Print each audit event as its JSON line.")
@click.option("--id", "transaction_id", metavar="TX", help="Only this saga's transitions.")
def tail(follow: bool, as_json: bool, transaction_id: str | None) -> None:
    """Print the audit topic: every saga transition, with the states before and after."""
    console = Console(highlight=False, soft_wrap=True)
    topic = Topics(_settings().topic_prefix).events

    @_run
    async def main() -> None:
        bus = _settings().event_bus(start_timeout=10.0)
        try:
            await bus.start()
            async for message in bus.read(topic, follow=follow):
                if transaction_id is not None and message.key != transaction_id.encode():
                    continue
                if as_json:
                    click.echo((message.value or b"").decode("utf-8", "replace"))
                    continue
                try:
                    event = codec.decode(message.value)
                except DecodeError as exc:
                    console.print(f"[red]undecodable audit record at offset {message.offset}: {exc}[/red]")
                    continue
                if isinstance(event, SagaEvent):
                    console.print(render.transition(event))
        finally:
            await bus.stop()

    main()


# ---------------------------------------------------------------- definitions and topics


@cli.command()
@click.argument("workflow", required=False)
@click.option("--workflows", "spec", required=True, metavar="MODULE[:ATTR]", help="Where the workflows are.")
def graph(workflow: str | None, spec: str) -> None:
    """Print a workflow as a Mermaid flowchart (the only one the module has, or WORKFLOW)."""
    workflows = {w.get_id(): w for w in load_workflows(spec)}
    if workflow is None and len(workflows) > 1:
        raise click.UsageError(f"name one of the workflows: {', '.join(sorted(workflows))}")
    chosen = workflows.get(workflow) if workflow else next(iter(workflows.values()))
    if chosen is None:
        raise _fail(f"no workflow {workflow!r} in {spec}; there are {', '.join(sorted(workflows))}")
    click.echo(mermaid(chosen), nl=False)


@cli.group()
def topics() -> None:
    """Manage the Kafka topics."""


@topics.command(name="create")
@click.option(
    "--workflows", "spec", metavar="MODULE[:ATTR]", help="Also their command and compensation topics."
)
def topics_create(spec: str | None) -> None:
    """Create the start, results, audit and dead-letter topics (and the workflows' own); idempotent."""
    settings = _settings()
    names = Topics(settings.topic_prefix)
    wanted = {names.start, names.results, names.events, names.dlq}
    for definition in load_workflows(spec) if spec else []:
        for step in definition.get_steps():
            wanted.update(names.of_worker(step.worker_name))
            if step.compensation:
                wanted.update(names.of_worker(step.compensation))

    @_run
    async def main() -> None:
        bus = settings.event_bus(start_timeout=10.0)
        try:
            await bus.start()
            await bus.ensure_topics(sorted(wanted))
        finally:
            await bus.stop()

    main()
    for name in sorted(wanted):
        click.echo(name)


cli.add_command(dlq)
cli.add_command(retry)
cli.add_command(skip)


@cli.command()
def demo() -> None:
    """Run the order-processing demo in one process, on the in-memory backend."""
    from .demo import main as run_demo

    run_demo()


def main() -> None:
    """The console script's entry point."""
    cli()
