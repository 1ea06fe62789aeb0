"""Time source injected everywhere a decision or deadline needs 'now'.

Policy code and transfer deadlines take a Clock; only WallClock reads the real monotonic clock.
"""
from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now_s(self) -> float: ...


class WallClock:
    def now_s(self) -> float:
        return time.monotonic()


class VirtualClock:
    """Moves only when told to: tests and the simulator drive it."""

    def __init__(self, start_s: float = 0.0):
        self._now_s = start_s

    def now_s(self) -> float:
        return self._now_s

    def advance(self, delta_s: float) -> None:
        if delta_s < 0:
            raise ValueError("time cannot go backwards")
        self._now_s += delta_s


class UnixClock:
    """Seconds since the Unix epoch: for values that must mean the same after a restart (IC-Cache's
    decaying example values, stored in the database)."""

    def now_s(self) -> float:
        return time.time()
