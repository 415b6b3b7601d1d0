"""``async with`` for everything that has ``start()`` and ``stop()``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self


class Service(ABC):
    """Started by ``await start()`` or ``async with``; stopped by ``await stop()`` or leaving the block."""

    @abstractmethod
    async def start(self) -> None:
        """Start; idempotent."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop; idempotent."""

    def unready_reason(self) -> str | None:
        """Why the started service cannot do its work right now (a backend refusing it), for the
        readiness probe; None when it can."""
        return None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
