"""The line for the engine's slots: at most one generation per slot, the rest wait first come,
first served, in a line of bounded length for a bounded time.

A request that must fetch something before it can run (a GLM-4V request's image, decoded by the
worker only once the line has taken it) holds a place in the line meanwhile: it counts as waiting,
and joins the queue proper, at its end, once it has what it needs.

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
        self._preparing = 0  # places held by requests fetching what they need before they queue
        self._ready = threading.Condition()
        self._hold_seconds = 1.0  # moving average of a generation, for Retry-After

    @contextmanager
    def slot(self, score: Callable[[S], int], gone: Callable[[], bool],
             prepare: Callable[[], None] | None = None) -> Iterator[S]:
        """Hold a free slot for the with-block: the free one with the highest ``score`` (the longest
        cached prefix). With ``prepare``, the request's place is taken first and ``prepare()`` runs
        holding it (outside the lock), before the request queues. Raises QueueFull, QueueTimeout,
        ClientGone, or what ``prepare`` raises."""
        chosen = self._acquire(score, gone, prepare)
        started = time.monotonic()
        try:
            yield chosen
        finally:
            with self._ready:
                self._free.append(chosen)
                self._hold_seconds = 0.8 * self._hold_seconds + 0.2 * (time.monotonic() - started)
                self._ready.notify_all()

    def _acquire(self, score: Callable[[S], int], gone: Callable[[], bool], prepare: Callable[[], None] | None) -> S:
        if prepare is not None:
            with self._ready:
                self._take_place()
                self._preparing += 1
            try:
                prepare()
            except BaseException:
                with self._ready:
                    self._preparing -= 1
                    self._ready.notify_all()
                raise
        with self._ready:
            if prepare is None:
                self._take_place()
            else:  # the place held while preparing becomes a place in the queue
                self._preparing -= 1
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

    def _take_place(self) -> None:
        """A new request may come in if a free slot is left for it by those ahead, or the queue has
        room; else QueueFull. Called holding the lock."""
        ahead = len(self._waiting) + self._preparing
        if len(self._free) <= ahead and ahead >= self.max_queue:
            raise QueueFull(f"all {self.slots} generation slot(s) are busy and {ahead} "
                            "request(s) are already waiting; retry later", retry_after=self.retry_after())

    def retry_after(self) -> float:
        return float(min(60, max(1, math.ceil(self._hold_seconds))))

    def counts(self) -> tuple[int, int]:
        """(generating, waiting), the requests preparing among those waiting."""
        with self._ready:
            return self.slots - len(self._free), len(self._waiting) + self._preparing
