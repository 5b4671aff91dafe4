"""The upstreams behind one model id, and each upstream's health as this worker sees it.

Choice: the fewest requests in flight per unit of weight, then the fewest served (so calls one
after another take turns). An upstream that fails before its first byte is left out for its
cool-down, doubled while it keeps failing (up to 8x); after that one request tries it again.
When every upstream is cooling down they are still tried, soonest back first: a request is never
refused on old news."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram

from backends.base import BackendError, RateLimited
from backends.upstream.config import UpstreamConfig

log = logging.getLogger("aigate")

REQUESTS = Counter("aigate_upstream_requests_total", "Requests sent to each upstream, by outcome "
                   "(ok, error: failed or broke, refused: the upstream refused the request as given)",
                   ["upstream", "outcome"])
FIRST_BYTE = Histogram("aigate_upstream_first_event_seconds", "From sending a request to an upstream to its first "
                       "event (or whole answer)", ["upstream"],
                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
UP = Gauge("aigate_upstream_up", "1 while an upstream is in service, 0 while it cools down after failing (the "
           "lowest over workers)", ["upstream"], multiprocess_mode="livemin")
IN_FLIGHT = Gauge("aigate_upstream_in_flight", "Requests running on each upstream", ["upstream"],
                  multiprocess_mode="livesum")
MAX_BACKOFF = 8  # a cool-down doubles while an upstream keeps failing, up to this many times its own
# How a metrics update runs: the server passes its guard (web.metrics.safely: a metrics fault is logged,
# never raised into a request); plain calls by default.
MetricsGuard = Callable[[Callable[[], None]], None]


def run(update: Callable[[], None]) -> None:
    update()


@dataclass
class Member:
    config: UpstreamConfig
    in_flight: int = 0
    served: int = 0
    requests: int = 0
    errors: int = 0
    failures: int = 0  # in a row
    cool_until: float = 0.0
    latency: float | None = None  # seconds to the first event, smoothed
    last_error: str = ""
    discovered: list[tuple[str, int]] | None = None  # GET /models, last read that worked
    _started: float = field(default=0.0, repr=False)
    count: MetricsGuard = field(default=run, repr=False)

    @property
    def name(self) -> str:
        return self.config.name

    def cooling(self, now: float) -> bool:
        return now < self.cool_until

    def begin(self) -> None:
        self.in_flight += 1
        self.served += 1
        self.requests += 1
        self._gauge()

    def end(self) -> None:
        self.in_flight -= 1
        self._gauge()

    def answered(self, seconds: float) -> None:
        """Its first event came: healthy again, however it failed before."""
        if self.failures:
            log.warning("upstream %s answers again", self.name)
        self.failures, self.cool_until = 0, 0.0
        self.latency = seconds if self.latency is None else 0.8 * self.latency + 0.2 * seconds

        def count() -> None:
            UP.labels(self.name).set(1)
            FIRST_BYTE.labels(self.name).observe(seconds)
            REQUESTS.labels(self.name, "ok").inc()
        self.count(count)

    def refused(self) -> None:
        """It refused the request as given (a 400): the request's fault, not the upstream's."""
        self.count(lambda: REQUESTS.labels(self.name, "refused").inc())

    def failed(self, error: BackendError, *, answering: bool = False) -> None:
        self.errors += 1
        self.failures += 1
        self.last_error = str(error)
        pause = self.config.cooldown * min(2 ** (self.failures - 1), MAX_BACKOFF)
        if isinstance(error, RateLimited) and error.retry_after is not None:  # it said when to come back
            pause = max(pause, min(error.retry_after, 3600.0))
        self.cool_until = time.monotonic() + pause
        log.warning("upstream %s failed %s (%s); left out for %.0f s", self.name,
                    "mid-answer" if answering else "before answering", error, pause)

        def count() -> None:
            UP.labels(self.name).set(0)
            REQUESTS.labels(self.name, "error").inc()
        self.count(count)

    def state(self, now: float) -> str:
        return "cooling down" if self.cooling(now) else "up" if self.failures == 0 else "retrying"

    def report(self, now: float) -> dict[str, object]:
        return {"state": self.state(now), "in_flight": self.in_flight, "requests": self.requests,
                "errors": self.errors,
                "latency_ms": None if self.latency is None else round(self.latency * 1000, 1),
                **({"last_error": self.last_error} if self.last_error else {})}

    def _gauge(self) -> None:
        self.count(lambda: IN_FLIGHT.labels(self.name).set(self.in_flight))


def order(members: list[Member]) -> list[Member]:
    """The members to try, best first."""
    now = time.monotonic()
    live = sorted((m for m in members if not m.cooling(now)),
                  key=lambda m: (m.in_flight / m.config.weight, m.served / m.config.weight))
    resting = sorted((m for m in members if m.cooling(now)), key=lambda m: m.cool_until)
    return live + resting
