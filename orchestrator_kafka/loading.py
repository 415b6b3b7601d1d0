"""Loading a user's workflows and handlers from ``module[:attr]`` for ``run``, ``worker`` and ``graph``."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from .workflow import WorkflowDefinition


def load_object(spec: str, default_attr: str) -> object:
    """The object ``module[:attr]`` names (``attr`` defaults to ``default_attr``; dots walk into it).

    Raises:
        click.BadParameter: the module does not import or has no such attribute.
    """
    module_name, _, attr = spec.partition(":")
    here = str(Path.cwd())
    sys.path.insert(0, here)  # as python -m does, so a user's module beside them imports
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(f"cannot import {module_name!r}: {exc}") from None
    finally:
        sys.path.remove(here)  # this entry, wherever the import moved it
    found: object = module
    for part in (attr or default_attr).split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise click.BadParameter(f"{module_name!r} has no attribute {attr or default_attr!r}") from None
    return found


def load_workflows(spec: str) -> list[WorkflowDefinition]:
    """The workflow definitions ``module[:attr]`` names: a definition, a sequence of them, or a function
    returning either (``attr`` defaults to ``workflows``).

    Raises:
        click.BadParameter: anything else.
    """
    found = load_object(spec, "workflows")
    if callable(found) and not isinstance(found, WorkflowDefinition):
        found = found()
    items = [found] if isinstance(found, WorkflowDefinition) else found
    if (
        not isinstance(items, Sequence)
        or not items
        or not all(isinstance(w, WorkflowDefinition) for w in items)
    ):
        raise click.BadParameter(f"{spec!r} is not a workflow definition or a non-empty list of them")
    return list(items)


def load_handlers(spec: str) -> dict[str, Callable[..., Any]]:
    """The handlers ``module[:attr]`` names: a mapping of worker name to function, or a function
    returning one (``attr`` defaults to ``handlers``).

    Raises:
        click.BadParameter: anything else.
    """
    found = load_object(spec, "handlers")
    if callable(found) and not isinstance(found, Mapping):
        found = found()
    if not isinstance(found, Mapping) or not found or not all(callable(f) for f in found.values()):
        raise click.BadParameter(f"{spec!r} is not a non-empty mapping of worker names to handlers")
    return dict(found)
