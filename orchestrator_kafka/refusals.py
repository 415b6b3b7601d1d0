"""What the orchestrator does while the state store refuses writes (Redis full, DESIGN section 10).

A refused write (:class:`~orchestrator_kafka.errors.StoreFullError`) wrote nothing, and whoever made it
tries again: the bus redelivers a consumed batch (its offsets are not committed), the housekeeping loop
claims its timers again. :class:`WriteRefusals` only keeps the account: the backoff before the next
try, one log line per interval instead of one per try, a counter, and the reason the readiness probe
gives while it lasts. No I/O and no sleeping here: the callers wait.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .errors import StoreFullError
from .ports import ILogger

# Backoff between tries while writes are refused: the first retry comes soon (memory may free at once,
# an operator raising maxmemory), the cap keeps a full Redis from being hammered while it lasts.
FIRST_DELAY = 0.1
MAX_DELAY = 5.0
# At most one log line per interval while refusals last, and a refusal older than this no longer makes
# the orchestrator unready: every retry path tries again well within it (MAX_DELAY), so a refusal that
# is not repeated was one that nobody retried (a request whose caller got the error).
INTERVAL = 30.0


class WriteRefusals:
    """The account of writes the state store refused; see the module docstring.

    ``clock`` returns seconds (monotonic); ``counted`` is called once per refusal (the metric).
    """

    def __init__(
        self,
        log: ILogger,
        *,
        clock: Callable[[], float] = time.monotonic,
        counted: Callable[[], None] = lambda: None,
        interval: float = INTERVAL,
        first_delay: float = FIRST_DELAY,
        max_delay: float = MAX_DELAY,
    ) -> None:
        self._log = log
        self._clock = clock
        self._counted = counted
        self._interval = interval
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._streak = 0  # refusals since the last accepted write
        self._since: float | None = None  # when the streak began
        self._last = 0.0  # when the last refusal came
        self._detail = ""
        self._logged_at: float | None = None  # the last log line, across streaks
        self._announced = False  # this streak was logged, so its end is worth a line too
        self._unlogged = 0  # refusals since the last log line

    @property
    def delay(self) -> float:
        """Seconds to wait before trying again: 0 with no refusal, then doubling up to the cap."""
        if self._streak == 0:
            return 0.0
        return min(self._max_delay, self._first_delay * 2.0 ** (self._streak - 1))

    def refused(self, exc: StoreFullError) -> float:
        """Count a refused write and log it if nothing was logged for an interval; the delay before the
        next try."""
        now = self._clock()
        if self._since is None:
            self._since = now
        self._streak += 1
        self._unlogged += 1
        self._last = now
        self._detail = str(exc)
        self._counted()
        if self._logged_at is None or now - self._logged_at >= self._interval:
            if self._announced:
                self._log.warning(
                    "the state store still refuses writes: %d refused in the last %.0fs, for %.0fs now; "
                    "nothing refused is committed, retrying",
                    self._unlogged,
                    now - self._logged_at if self._logged_at is not None else 0.0,
                    now - self._since,
                )
            else:
                self._log.warning(
                    "the state store refuses writes (%s): nothing refused is committed; retrying with "
                    "backoff (up to %gs) until it has memory again",
                    exc,
                    self._max_delay,
                )
            self._logged_at, self._announced, self._unlogged = now, True, 0
        return self.delay

    def accepted(self) -> None:
        """A write went through: the store has room again; the backoff starts over."""
        if self._since is None:
            return
        if self._announced:
            self._log.warning(
                "the state store accepts writes again after %.1fs; %d refused writes since the last report",
                self._clock() - self._since,
                self._unlogged,
            )
            self._unlogged = 0
        # An unannounced streak's refusals stay counted for the next line.
        self._streak, self._since, self._announced = 0, None, False

    def reason(self) -> str | None:
        """Why the orchestrator is not ready, while writes are refused (a refusal within the interval
        and no write accepted since); else None."""
        if self._since is None or self._clock() - self._last > self._interval:
            return None
        return f"the state store has refused writes for {self._clock() - self._since:.0f}s: {self._detail}"
