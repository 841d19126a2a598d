"""A time budget for an inference run: a deadline, the run's own rate, and what to give up.

A Kaggle submission that is not written before the limit scores nothing, so inference watches
its throughput against a deadline and degrades in steps instead of running late:

1. drop optional work (flip TTA first, then the extra ensemble members), one step per measured
   tomogram, while the projection of the remaining work at the current rate overshoots;
2. when even the next tomogram would end after the deadline, stop: the tomograms left get
   ``-1`` rows, and the submission is written in time.

The rate is the wall time between finished tomograms (a moving mean of the last few, measured
anew after each step down), so reading overlapped with the model counts as it really runs.

Example:
    >>> clock = FakeClock()
    >>> budget = Budget(Deadline.in_seconds(100, clock=clock), reserve_seconds=0)
    >>> budget.start()
    >>> clock.advance(30)
    >>> budget.finished()  # one tomogram took 30 s; 70 s are left
    30.0
    >>> budget.should_drop_optional(remaining_items=2), budget.can_start_next()
    (False, True)
    >>> budget.should_drop_optional(remaining_items=3)  # 90 s of work in 70 s
    True
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

# A plain number below this is "seconds from now"; at or above it, a Unix time (it is 2001-09-09,
# and nobody means a relative deadline of 31 years).
EPOCH_CUTOFF = 1e9
DEFAULT_RESERVE_SECONDS = 30.0  # kept free to write submission.csv and exit
DEFAULT_SAFETY = 1.2  # the next tomogram may take this much longer than the recent mean
DEFAULT_WINDOW = 8  # finished tomograms in the moving mean


class BudgetError(ValueError):
    """A deadline that cannot be understood; the message says what to pass instead."""


@dataclass(frozen=True)
class Deadline:
    """A point in wall-clock time by which the run must have written its submission.

    Attributes:
        at: Unix time (seconds since the epoch, as ``time.time()``).
        clock: returns the current Unix time (replace it in tests).
    """

    at: float
    clock: Callable[[], float] = field(default=time.time, compare=False, repr=False)

    @classmethod
    def in_seconds(cls, seconds: float, clock: Callable[[], float] = time.time) -> "Deadline":
        """The deadline ``seconds`` from now (negative: already passed)."""
        if not math.isfinite(seconds):
            raise BudgetError(f"deadline seconds must be finite (got {seconds})")
        return cls(clock() + float(seconds), clock)

    @classmethod
    def at_time(cls, when: float | dt.datetime, clock: Callable[[], float] = time.time,
                ) -> "Deadline":
        """The deadline at a Unix time or a ``datetime`` (a naive one is local time)."""
        at = when.timestamp() if isinstance(when, dt.datetime) else float(when)
        if not math.isfinite(at):
            raise BudgetError(f"deadline time must be finite (got {when})")
        return cls(at, clock)

    @classmethod
    def coerce(cls, value: "Deadline | float | int | dt.datetime | None",
               clock: Callable[[], float] = time.time) -> "Deadline | None":
        """Read a user's deadline: a :class:`Deadline`, a ``datetime``, a number of seconds from
        now, or a Unix time (numbers at or above :data:`EPOCH_CUTOFF`); None means no deadline.
        """
        if value is None or isinstance(value, Deadline):
            return value
        if isinstance(value, dt.datetime):
            return cls.at_time(value, clock)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BudgetError(f"deadline {value!r} is neither seconds from now nor a Unix time: "
                              f"pass e.g. 3600 (an hour) or time.time() + 3600")
        if value >= EPOCH_CUTOFF:
            return cls.at_time(value, clock)
        return cls.in_seconds(value, clock)

    def remaining(self) -> float:
        """Seconds left (negative once passed)."""
        return self.at - self.clock()

    def passed(self) -> bool:
        return self.remaining() <= 0

    def __str__(self) -> str:
        when = dt.datetime.fromtimestamp(self.at).isoformat(timespec="seconds")
        return f"{when} ({self.remaining() / 60:+.1f} min from now)"


class Budget:
    """Tracks a run's rate against a :class:`Deadline` and says when to give up work.

    Call :meth:`start` before the first item and :meth:`finished` after each; call
    :meth:`stepped_down` after dropping optional work, so the rate is measured again at the new
    level before another step is considered.

    Args:
        deadline: when the run must be done.
        reserve_seconds: time kept free before the deadline (writing the submission, exiting).
        safety: factor on the recent mean time per item when deciding whether one more fits.
        window: number of recent items in the mean.
    """

    def __init__(self, deadline: Deadline, reserve_seconds: float = DEFAULT_RESERVE_SECONDS,
                 safety: float = DEFAULT_SAFETY, window: int = DEFAULT_WINDOW) -> None:
        if reserve_seconds < 0 or safety < 1 or window < 1:
            raise BudgetError(f"need reserve_seconds >= 0, safety >= 1 and window >= 1 (got "
                              f"{reserve_seconds}, {safety}, {window})")
        self.deadline = deadline
        self.reserve_seconds = float(reserve_seconds)
        self.safety = float(safety)
        self._durations: deque[float] = deque(maxlen=window)
        self._last: float | None = None
        self._fresh = False  # a step down happened and its level is not measured yet
        self.items_done = 0
        self.steps_down = 0

    @property
    def clock(self) -> Callable[[], float]:
        return self.deadline.clock

    def start(self) -> None:
        """Mark the start of the first item (or of a pause's end)."""
        self._last = self.clock()

    def finished(self) -> float:
        """Record that one item finished; returns its wall seconds since the previous mark.

        The first item after a step down replaces the older measurements (they were made with
        more work per item).
        """
        now = self.clock()
        seconds = max(0.0, now - (self._last if self._last is not None else now))
        self._last = now
        if self._fresh:
            self._durations.clear()
            self._fresh = False
        self._durations.append(seconds)
        self.items_done += 1
        return seconds

    def stepped_down(self) -> None:
        """Optional work was dropped: forget the old rate once the next item is measured.

        The old rate stays as the (pessimistic) estimate until then.
        """
        self.steps_down += 1
        self._fresh = True

    @property
    def measured(self) -> bool:
        """Whether the current level has at least one measured item."""
        return bool(self._durations) and not self._fresh

    @property
    def seconds_per_item(self) -> float | None:
        """Mean wall seconds of the recent items (None before the first)."""
        if not self._durations:
            return None
        return sum(self._durations) / len(self._durations)

    def available(self) -> float:
        """Seconds left for work: time to the deadline minus the reserve."""
        return self.deadline.remaining() - self.reserve_seconds

    def projected(self, remaining_items: int) -> float | None:
        """Seconds the remaining items need at the recent rate (None before any is measured)."""
        rate = self.seconds_per_item
        return None if rate is None else remaining_items * rate

    def should_drop_optional(self, remaining_items: int) -> bool:
        """True when the remaining items, at the current level's measured rate, end after the
        deadline (False until the current level has been measured)."""
        projected = self.projected(remaining_items)
        return self.measured and projected is not None and projected > self.available()

    def is_late(self, remaining_items: int) -> bool:
        """True when the remaining items would end after the deadline at the recent rate, or
        the deadline has already passed; says nothing about what to drop."""
        projected = self.projected(remaining_items)
        return self.available() <= 0 or (projected is not None and projected > self.available())

    def can_start_next(self) -> bool:
        """Whether one more item is expected to finish before the deadline (with the safety
        factor); before any measurement, whether any time is left at all."""
        rate = self.seconds_per_item
        needed = 0.0 if rate is None else rate * self.safety
        return self.available() > needed


class FakeClock:
    """A settable clock for tests and examples: ``clock()`` returns ``clock.now``."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = float(now)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
