"""The streams running in this worker, so that a worker told to stop (a reload, a shutdown) can end
the ones still running at the end of GRACEFUL_TIMEOUT properly: an error event and `data: [DONE]`
to the client and `error=server_shutting_down` in the log, instead of a connection that just drops
(gunicorn kills what is left a moment later, the master with SIGKILL on a shutdown)."""

from __future__ import annotations

import logging
from typing import Any

from greenlet import GreenletExit, getcurrent

from web.record import RequestRecord

log = logging.getLogger("aigate")

STOPPED_CODE = "server_shutting_down"


class ServerStopping(GreenletExit):  # type: ignore[misc]  # greenlet ships no type hints
    """Thrown into a stream's greenlet at the end of the graceful timeout. A GreenletExit, so that
    backends run their clean-up as for any kill, and gunicorn takes it quietly if it lands outside
    the stream (in a socket write to a client that does not read)."""


class RunningStreams:
    def __init__(self) -> None:
        self._running: dict[Any, RequestRecord] = {}

    def add(self, record: RequestRecord) -> Any:
        me = getcurrent()
        self._running[me] = record
        return me

    def discard(self, token: Any) -> None:
        self._running.pop(token, None)

    def stop_all(self) -> int:
        """End every running stream (under gevent: each is a greenlet blocked somewhere)."""
        import gevent

        running = list(self._running.items())
        for glet, record in running:
            record.error = STOPPED_CODE  # logged so even if the stream cannot be told
            gevent.kill(glet, ServerStopping)
        return len(running)


def end_streams_before_the_kill(worker: Any, streams: RunningStreams, graceful_timeout: float) -> None:
    """For gunicorn's post_worker_init: once the worker is told to stop, wait out most of the
    graceful timeout, then end the streams still running while there is time to say so."""
    import gevent

    # Time left to write the error event before the kill (the master's SIGKILL, on a shutdown).
    margin = min(3.0, max(1.0, graceful_timeout / 4))

    def watch() -> None:
        while worker.alive:
            gevent.sleep(0.2)
        gevent.sleep(max(0.0, graceful_timeout - margin - 0.2))
        ended = streams.stop_all()
        if ended:
            log.warning("graceful timeout: %d stream(s) still running were ended with an error event", ended)

    gevent.spawn(watch)
