"""Writes ``schemas/``: one JSON Schema (draft 2020-12) per wire message, generated from the pydantic
models in ``orchestrator_kafka.models``, plus ``message.schema.json`` accepting any of them.

usage: python scripts/schemas.py [--check] [--dir DIR]

Without ``--check`` it (re)writes ``DIR/<event_type>.schema.json`` and ``DIR/message.schema.json`` and
deletes any other ``*.schema.json`` there (a message type that no longer exists). With ``--check`` it
writes nothing and exits 1, naming every file that differs, when the files on disk are not exactly what
it would write. The output is deterministic (sorted keys, 2-space indent, trailing newline), so
regenerating unchanged models is byte-identical.

Every schema carries one example message in ``examples``, built from its model (so it is valid by
construction); ``tests/unit/test_schemas.py`` also checks it against the schema with a JSON Schema
validator and decodes it with ``orchestrator_kafka.codec.decode``.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orchestrator_kafka.constants import SCHEMA_VERSION
from orchestrator_kafka.models import (
    MESSAGE_ADAPTER,
    MESSAGE_TYPES,
    AuditAction,
    AuditActionName,
    CancelBody,
    CancelSaga,
    CommandBody,
    Envelope,
    ErrorInfo,
    RepairBody,
    RepairSaga,
    ResultBody,
    SagaEvent,
    StartBody,
    StartSaga,
    StepCommand,
    StepResult,
    TransitionBody,
    command_id,
    derived_event_id,
)

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_DIR = ROOT / "schemas"
DIALECT = "https://json-schema.org/draft/2020-12/schema"
# The $id names the contract version (constants.SCHEMA_VERSION), so a schema of another version is
# another document. It is an identifier, never fetched: validators resolve $ref inside each file.
BASE_ID = f"https://orchestrator-kafka.dev/schemas/{SCHEMA_VERSION}/"
COMBINED = "message"


@dataclass(frozen=True, slots=True)
class Route:
    """Where a message travels: its topic and who writes and reads it."""

    topic: str
    producer: str
    consumer: str


ROUTES: dict[str, Route] = {
    "saga.start": Route(
        "<prefix>.start",
        "any client starting a saga (the Python API: Orchestrator.execute_workflow)",
        "the orchestrator",
    ),
    "saga.cancel": Route(
        "<prefix>.start",
        "any client cancelling a saga (the Python API: Orchestrator.cancel_workflow)",
        "the orchestrator",
    ),
    "saga.repair": Route(
        "<prefix>.start",
        "an operator repairing a saga (SagaClient.retry, skip_compensation and force_cancel; the CLI's"
        " retry, skip and cancel --force)",
        "the orchestrator",
    ),
    "step.command": Route(
        "<prefix>.commands.<worker_name> (kind execute) or <prefix>.compensations.<worker_name> "
        "(kind compensate)",
        "the orchestrator",
        "the worker registered as <worker_name>",
    ),
    "step.result": Route(
        "<prefix>.results", "workers, one per step.command they consume", "the orchestrator"
    ),
    "saga.transition": Route(
        "<prefix>.events", "the orchestrator, once per saga transition", "operators, dashboards, auditors"
    ),
}

# The example saga: an order of the demo workflow (orchestrator_kafka.examples.orders).
_TX = "0c6f2f4e-5b1d-4a8e-9c3b-2d7e1f0a9b84"
_WORKFLOW = "order_processing"
_AT = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
_ORDER: dict[str, Any] = {
    "order_id": "A-1001",
    "customer_tier": "premium",
    "amount": 42.5,
    "address": "1 Main St, Springfield",
}
_RUN_ID = "5f0c2a9e71d3b846"
_CHARGE_ID = command_id(_TX, "charge", "execute", 2, _RUN_ID)


def examples() -> dict[str, Envelope]:
    """One realistic message per event type, keyed by event type; ids follow the orchestrator's own
    formats (command ids from ``models.command_id``, derived event ids where the engine derives them)."""
    found: dict[str, Envelope] = {
        "saga.start": StartSaga(
            event_id="3b0d8a52-6f9e-4c1a-8d27-5e4f3a2b1c0d",
            transaction_id=_TX,
            workflow_id=_WORKFLOW,
            occurred_at=_AT,
            body=StartBody(context=_ORDER),
        ),
        "saga.cancel": CancelSaga(
            event_id="9a7e6d5c-4b3a-4291-8f0e-1d2c3b4a5968",
            transaction_id=_TX,
            workflow_id=_WORKFLOW,
            occurred_at=_AT,
            body=CancelBody(reason="cancelled by request"),
        ),
        "saga.repair": RepairSaga(
            event_id="c4d3e2f1-a0b9-4c8d-9e7f-6a5b4c3d2e1f",
            transaction_id=_TX,
            workflow_id=_WORKFLOW,
            occurred_at=_AT,
            body=RepairBody(
                action="skip_compensation",
                run_id=_RUN_ID,
                step="charge",
                reason="refunded by hand (ticket OPS-4711)",
            ),
        ),
        "step.command": StepCommand(
            event_id=derived_event_id(_CHARGE_ID),
            transaction_id=_TX,
            workflow_id=_WORKFLOW,
            occurred_at=_AT,
            body=CommandBody(
                command_id=_CHARGE_ID,
                step="charge",
                worker_name="charge_payment",
                kind="execute",
                attempt=2,
                data={**_ORDER, "in_stock": True, "card_ok": True, "reservation_id": "R-A-1001"},
                timeout=None,
            ),
        ),
        "step.result": StepResult(
            event_id="5f1e2d3c-4b5a-4697-a8b9-c0d1e2f3a4b5",
            transaction_id=_TX,
            workflow_id=_WORKFLOW,
            occurred_at=_AT,
            body=ResultBody(
                command_id=_CHARGE_ID,
                step="charge",
                kind="execute",
                attempt=2,
                status="failed",
                error=ErrorInfo(
                    type="ConnectionError", message="payment gateway unreachable", retryable=True
                ),
            ),
        ),
        "saga.transition": SagaEvent(
            event_id=derived_event_id(f"{_TX}:4:audit"),
            transaction_id=_TX,
            workflow_id=_WORKFLOW,
            occurred_at=_AT,
            body=TransitionBody(
                from_state="running",
                to_state="running",
                version=4,
                actions=[
                    AuditAction(
                        action=AuditActionName.STEP_SUCCEEDED,
                        state="running",
                        step="reserve",
                        kind="execute",
                        attempt=1,
                    ),
                    AuditAction(
                        action=AuditActionName.STEP_DISPATCHED,
                        state="running",
                        step="charge",
                        worker_name="charge_payment",
                        kind="execute",
                        attempt=1,
                    ),
                ],
            ),
        ),
    }
    assert set(found) == set(MESSAGE_TYPES), "an event type has no example"
    return found


def _example(message: Envelope) -> dict[str, Any]:
    # As a Python producer writes it: every field, defaults included.
    dumped: dict[str, Any] = message.model_dump(mode="json")
    return dumped


def _require_event_type(schema: dict[str, Any]) -> None:
    """Make ``event_type`` required: the model defaults it, but the decoder picks the model by it, so a
    message without it is dead-lettered (``unknown_event_type``)."""
    required: list[str] = schema["required"]
    if "event_type" not in required:
        required.append("event_type")


def _describe(event_type: str, model: type[Envelope]) -> str:
    route = ROUTES[event_type]
    doc = " ".join((model.__doc__ or "").split())
    return (
        f"{doc}\n\nTopic: {route.topic}. Kafka key: the transaction_id.\n"
        f"Produced by: {route.producer}.\nConsumed by: {route.consumer}."
    )


def message_schema(event_type: str) -> dict[str, Any]:
    """The JSON Schema of one message type, with its example."""
    model = MESSAGE_TYPES[event_type]
    schema = model.model_json_schema(mode="validation")
    _require_event_type(schema)
    return {
        "$schema": DIALECT,
        "$id": f"{BASE_ID}{event_type}.schema.json",
        **schema,
        "title": f"{model.__name__} ({event_type})",
        "description": _describe(event_type, model),
        "examples": [_example(examples()[event_type])],
    }


def combined_schema() -> dict[str, Any]:
    """The JSON Schema of any message: exactly one of the message schemas, told apart by event_type."""
    schema = copy.deepcopy(MESSAGE_ADAPTER.json_schema(mode="validation"))
    # OpenAPI's keyword, not JSON Schema's: strict validators (ajv) refuse unknown keywords, and the
    # const event_type of every branch already makes the oneOf unambiguous.
    schema.pop("discriminator", None)
    for model in MESSAGE_TYPES.values():
        _require_event_type(schema["$defs"][model.__name__])
    found = examples()
    return {
        "$schema": DIALECT,
        "$id": f"{BASE_ID}{COMBINED}.schema.json",
        **schema,
        "title": "Any orchestrator-kafka wire message",
        "description": (
            "One of the wire messages, told apart by event_type: "
            + ", ".join(sorted(MESSAGE_TYPES))
            + ". Each also has a schema of its own, <event_type>.schema.json."
        ),
        "examples": [_example(found[event_type]) for event_type in MESSAGE_TYPES],
    }


def render(schema: dict[str, Any]) -> str:
    """The bytes written for ``schema``: sorted keys, 2-space indent, UTF-8 as is, trailing newline."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def generate() -> dict[str, str]:
    """Every file's name and text, as this script writes them."""
    files = {f"{event_type}.schema.json": render(message_schema(event_type)) for event_type in MESSAGE_TYPES}
    files[f"{COMBINED}.schema.json"] = render(combined_schema())
    return files


def differences(directory: Path) -> list[str]:
    """What differs between ``directory`` and :func:`generate`, one line (or diff) per file; empty when
    nothing does."""
    wanted = generate()
    found = {p.name: p.read_text(encoding="utf-8") for p in sorted(directory.glob("*.schema.json"))}
    problems: list[str] = []
    for name, text in wanted.items():
        if name not in found:
            problems.append(f"missing: {name}")
        elif found[name] != text:
            diff = difflib.unified_diff(
                found[name].splitlines(),
                text.splitlines(),
                f"{name} (on disk)",
                f"{name} (generated)",
                lineterm="",
            )
            lines = list(diff)
            shown = "\n".join(lines[:40]) + (
                f"\n... {len(lines) - 40} more diff lines" if len(lines) > 40 else ""
            )
            problems.append(f"differs: {name}\n{shown}")
    problems.extend(f"not generated (stale): {name}" for name in sorted(set(found) - set(wanted)))
    return problems


def write(directory: Path) -> list[str]:
    """Write every generated file into ``directory`` and delete stale ``*.schema.json``; the names of
    the files changed."""
    directory.mkdir(parents=True, exist_ok=True)
    wanted = generate()
    changed: list[str] = []
    for name, text in wanted.items():
        path = directory / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            changed.append(name)
    for path in sorted(directory.glob("*.schema.json")):
        if path.name not in wanted:
            path.unlink()
            changed.append(path.name)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate (or --check) the wire messages' JSON Schemas.")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the files are stale")
    parser.add_argument("--dir", type=Path, default=SCHEMA_DIR, help="the schema directory [schemas/]")
    args = parser.parse_args(argv)
    directory: Path = args.dir
    if args.check:
        problems = differences(directory)
        if problems:
            print(
                f"{directory}: {len(problems)} schema file(s) out of date with the models:", file=sys.stderr
            )
            for problem in problems:
                print(f"  {problem}", file=sys.stderr)
            print("run scripts/schemas to regenerate them, then commit the result", file=sys.stderr)
            return 1
        print(f"{directory}: {len(generate())} schema files up to date")
        return 0
    changed = write(directory)
    print(
        f"{directory}: {len(changed)} file(s) written or removed"
        + (f": {', '.join(changed)}" if changed else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
