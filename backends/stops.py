"""Stop sequences over a stream of text pieces, without ever emitting part of a stop string."""

from __future__ import annotations


class StopMatcher:
    """Feed text as it is generated; get back what is safe to emit.

    Text that could be the start of a stop string is held back until the next piece proves it
    is not (a stop string may arrive split across tokens). Once a stop string is complete,
    ``stopped`` is true, ``matched`` says which one it was, and nothing from the stop string on is
    ever emitted.
    """

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text (the Anthropic API reports it)

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self._pending + text
        cut = self._first_stop(buf)
        # A stop string that began earlier may still complete: wait for it (the earliest start wins,
        # however the text was split into pieces).
        undecided = self._undecided_start(buf, before=len(buf) if cut < 0 else cut)
        if undecided is None and cut >= 0:
            self._stop(buf, cut)
            self._pending = ""
            return buf[:cut]
        keep_from = len(buf) if undecided is None else undecided
        self._pending = buf[keep_from:]
        return buf[:keep_from]

    def flush(self) -> str:
        """The end of the text: what was held back holds a stop string, or was not one after all."""
        rest, self._pending = self._pending, ""
        if self.stopped:
            return ""
        cut = self._first_stop(rest)
        if cut >= 0:
            self._stop(rest, cut)
            return rest[:cut]
        return rest

    def _stop(self, buf: str, cut: int) -> None:
        self.stopped = True
        self.matched = next(s for s in self.stops if buf.find(s) == cut)

    def _first_stop(self, buf: str) -> int:
        return min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)

    def _undecided_start(self, buf: str, before: int) -> int | None:
        """The earliest position before ``before`` from which buf's end is an unfinished stop string."""
        for start in range(max(0, len(buf) - self._hold), before):
            tail = buf[start:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self.stops):
                return start
        return None
