"""The line for the engine's slots: at most one generation per slot, the rest wait first come,
first served, in a line of bounded length for a bounded time.

One process owns the slots, so the line is a condition variable, not files: nothing for a tmp
cleaner to delete, and a request that dies takes its place with it.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

from backends.base import ClientGone, QueueFull, QueueTimeout

_CHECK_SECONDS = 0.25  # how often a waiting request looks whether its client is still there

S = TypeVar("S")


class Line(Generic[S]):
    def __init__(self, slots: list[S], max_queue: int, queue_timeout: float) -> None:
        self._free = list(slots)
        self.slots = len(slots)
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self._waiting: deque[object] = deque()
        self._ready = threading.Condition()
        self._hold_seconds = 1.0  # moving average of a generation, for Retry-After

    @contextmanager
    def slot(self, score: Callable[[S], int], gone: Callable[[], bool]) -> Iterator[S]:
        """Hold a free slot for the with-block: the free one with the highest ``score`` (the longest
        cached prefix). Raises QueueFull, QueueTimeout, or ClientGone."""
        chosen = self._acquire(score, gone)
        started = time.monotonic()
        try:
            yield chosen
        finally:
            with self._ready:
                self._free.append(chosen)
                self._hold_seconds = 0.8 * self._hold_seconds + 0.2 * (time.monotonic() - started)
                self._ready.notify_all()

    def _acquire(self, score: Callable[[S], int], gone: Callable[[], bool]) -> S:
        with self._ready:
            if len(self._waiting) >= self.max_queue and not (self._free and not self._waiting):
                raise QueueFull(f"all {self.slots} generation slot(s) are busy and {len(self._waiting)} "
                                "request(s) are already waiting; retry later", retry_after=self.retry_after())
            ticket = object()
            self._waiting.append(ticket)
            deadline = time.monotonic() + self.queue_timeout
            try:
                while not (self._free and self._waiting[0] is ticket):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise QueueTimeout(f"waited {self.queue_timeout:g}s in line for a generation slot",
                                           retry_after=self.retry_after())
                    self._ready.wait(min(left, _CHECK_SECONDS))
                    if gone():
                        raise ClientGone
                best = max(self._free, key=score)
                self._free.remove(best)
                return best
            finally:
                self._waiting.remove(ticket)
                self._ready.notify_all()  # the next in line may now be first

    def retry_after(self) -> float:
        return float(min(60, max(1, math.ceil(self._hold_seconds))))

    def counts(self) -> tuple[int, int]:
        """(generating, waiting)."""
        with self._ready:
            return self.slots - len(self._free), len(self._waiting)
