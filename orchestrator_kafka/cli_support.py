"""What the command-line modules share: running an async command, the settings, a client on them."""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import click

from .errors import OrchestratorError
from .settings import Settings

if TYPE_CHECKING:
    from .client import SagaClient

P = ParamSpec("P")
T = TypeVar("T")


def fail(message: str) -> click.ClickException:
    return click.ClickException(message)


def run(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, T]:
    """Run an async command on a fresh loop; the project's errors become one clear line."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return asyncio.run(fn(*args, **kwargs))
        except OrchestratorError as exc:
            raise fail(str(exc)) from None
        except ValueError as exc:  # an unknown saga, from the API's ValueError contract
            raise fail(str(exc).splitlines()[0]) from None
        except OSError as exc:  # e.g. the health port is taken
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            sys.exit(130)

    return wrapper


def settings() -> Settings:
    settings = click.get_current_context().find_object(Settings)
    assert settings is not None
    return settings


@asynccontextmanager
async def client(*, bus: bool = True, store: bool = True) -> AsyncIterator[SagaClient]:
    """A :class:`SagaClient` on the configured backends (the bus started), closed on the way out."""
    from .client import SagaClient

    settings_ = settings()
    the_bus = settings_.event_bus(start_timeout=10.0) if bus else None
    the_store = settings_.state_store() if store else None
    try:
        if the_bus is not None:
            await the_bus.start()
        yield SagaClient(the_bus, the_store, topic_prefix=settings_.topic_prefix)
    finally:
        if the_bus is not None:
            await the_bus.stop()
        if the_store is not None:
            await the_store.close()
