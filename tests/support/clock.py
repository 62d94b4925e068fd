"""A clock that moves only when a test says so (pass it where code takes ``clock=``)."""

from __future__ import annotations


class FakeClock:
    """Seconds, as ``time.monotonic`` or ``time.time`` would give them, standing still until :meth:`advance`."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
