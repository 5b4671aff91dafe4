"""Generation slots shared by every process on the machine: at most N generations at once, the
rest wait in one first-come-first-served line of bounded length.

Two generations at once on a small machine are many times slower than one after the other
(ggml's threads spin against each other), and gunicorn runs several worker processes, so the
limit has to hold across processes, survive a worker that is SIGKILLed while holding a slot,
and never block a gevent worker's other requests while a request waits.

How: a directory of lock files. Entry i (``entry-i``) is held with ``flock`` by the request
that has place i in line (slots + max_queue places in all) and holds its ticket number and
state; the kernel drops a dead process's locks, so its place frees itself. A guard lock
(``guard``) serialises the short reads and writes of the table and holds the ticket counter.
A waiting request looks at the table every few milliseconds (``time.sleep``, which is
cooperative under gevent) and starts when fewer live requests are ahead of it than there are
free slots.
"""

from __future__ import annotations

import fcntl
import math
import os
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from backends.base import QueueFull, QueueTimeout

_ENTRY = struct.Struct("<QB")  # ticket, state
_WAITING, _RUNNING = 1, 2
_POLL_SECONDS = 0.005


class GenerationSlots:
    def __init__(self, directory: Path, slots: int, max_queue: int, queue_timeout: float) -> None:
        self.directory = directory
        self.slots = slots
        self.places = slots + max_queue
        self.queue_timeout = queue_timeout
        self._local = threading.Lock()  # threads of one process share flock ownership
        self._pid = -1
        self._guard = -1
        self._entries: list[int] = []
        self._mine: set[int] = set()  # entries this process holds
        self._hold_seconds = 1.0  # moving average of a generation, for Retry-After

    @contextmanager
    def acquire(self) -> Iterator[None]:
        """Hold one slot for the body of the with-block; raise QueueFull or QueueTimeout."""
        entry = self._join_line()
        try:
            deadline = time.monotonic() + self.queue_timeout
            while not self._try_start(entry):
                if time.monotonic() >= deadline:
                    raise QueueTimeout(f"waited {self.queue_timeout:g}s in line for a generation slot",
                                       retry_after=self.retry_after())
                time.sleep(_POLL_SECONDS)
        except BaseException:
            self._leave(entry)
            raise
        started = time.monotonic()
        try:
            yield
        finally:
            self._leave(entry)
            self._hold_seconds = 0.8 * self._hold_seconds + 0.2 * (time.monotonic() - started)

    def retry_after(self) -> float:
        return float(min(60, max(1, math.ceil(self._hold_seconds))))

    def in_line(self) -> int:
        """Live requests in line or generating, machine-wide."""
        return sum(self.counts())

    def counts(self) -> tuple[int, int]:
        """(generating, waiting), machine-wide."""
        with self._guarded():
            states = [live[1] for i in range(self.places) if (live := self._read_live(i)) is not None]
        running = states.count(_RUNNING)
        return running, len(states) - running

    # -- the table ---------------------------------------------------------------------------

    def _join_line(self) -> int:
        with self._guarded():
            for i in range(self.places):
                if i in self._mine or not self._try_lock(i):
                    continue
                self._mine.add(i)
                ticket = struct.unpack("<Q", os.pread(self._guard, 8, 0).ljust(8, b"\0"))[0] + 1
                os.pwrite(self._guard, struct.pack("<Q", ticket), 0)
                os.pwrite(self._entries[i], _ENTRY.pack(ticket, _WAITING), 0)
                return i
        raise QueueFull(f"all {self.slots} generation slot(s) are busy and {self.places - self.slots} "
                        "request(s) are already waiting; retry later", retry_after=self.retry_after())

    def _try_start(self, entry: int) -> bool:
        with self._guarded():
            my_ticket, _ = _ENTRY.unpack(os.pread(self._entries[entry], _ENTRY.size, 0))
            busy = 0
            for i in range(self.places):
                if i == entry:
                    continue
                live = self._read_live(i)
                if live is not None and (live[1] == _RUNNING or live[0] < my_ticket):
                    busy += 1
            if busy >= self.slots:
                return False
            os.pwrite(self._entries[entry], _ENTRY.pack(my_ticket, _RUNNING), 0)
            return True

    def _leave(self, entry: int) -> None:
        with self._local:
            if self._pid == os.getpid() and entry in self._mine:
                fcntl.flock(self._entries[entry], fcntl.LOCK_UN)
                self._mine.discard(entry)

    def _read_live(self, i: int) -> tuple[int, int] | None:
        """(ticket, state) of a live entry, None if nobody holds it. Call under the guard."""
        if i not in self._mine and self._try_lock(i):
            fcntl.flock(self._entries[i], fcntl.LOCK_UN)
            return None
        raw = os.pread(self._entries[i], _ENTRY.size, 0)
        return _ENTRY.unpack(raw) if len(raw) == _ENTRY.size else None

    def _try_lock(self, i: int) -> bool:
        try:
            fcntl.flock(self._entries[i], fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    @contextmanager
    def _guarded(self) -> Iterator[None]:
        with self._local:
            self._open()
            fcntl.flock(self._guard, fcntl.LOCK_EX)  # held for microseconds; never across a sleep
            try:
                yield
            finally:
                fcntl.flock(self._guard, fcntl.LOCK_UN)

    def _open(self) -> None:
        """Open the files once per process: descriptors inherited over fork would share locks."""
        if self._pid == os.getpid():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        self._guard = os.open(self.directory / "guard", flags, 0o600)
        self._entries = [os.open(self.directory / f"entry-{i}", flags, 0o600) for i in range(self.places)]
        self._mine = set()
        self._pid = os.getpid()
