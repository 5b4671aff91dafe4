"""Stop sequences over a stream of text pieces, without ever emitting part of a stop string."""

from __future__ import annotations


class StopMatcher:
    """Feed text as it is generated; get back what is safe to emit.

    Text that could be the start of a stop string is held back until the next piece proves it
    is not (a stop string may arrive split across tokens). Once a stop string is complete,
    ``stopped`` is true and nothing from the stop string on is ever emitted.
    """

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self._pending + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._pending = ""
            return buf[:cut]
        keep = self._partial_suffix(buf)
        self._pending = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """The end of the text: what was held back was not a stop string after all."""
        rest, self._pending = self._pending, ""
        return "" if self.stopped else rest

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest end of buf that begins some stop string."""
        for n in range(min(self._hold, len(buf)), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
