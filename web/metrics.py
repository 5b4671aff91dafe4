"""Prometheus metrics. Under gunicorn every worker writes its own files in
PROMETHEUS_MULTIPROC_DIR (set by gunicorn.conf.py before anything imports prometheus_client),
and a scrape of any worker adds them all up.

Metrics never take a request down: every update goes through ``safely``, which skips it (and
makes /ready say why) while the directory is missing and cannot be recreated, or its file
system is nearly full (prometheus_client writes through mmap: a write into a full file system
is a SIGBUS that kills the worker, not an exception), and logs any other failure.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from flask import Flask
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector

if TYPE_CHECKING:
    from web.record import RequestRecord

EXTENSION = "aigate.metrics"
CONTENT_TYPE = CONTENT_TYPE_LATEST
MIN_FREE_BYTES = 8 * 1024 * 1024  # a worker's files start at 1 MiB each, three kinds; they may double
FAILURE_MEMORY = 60.0  # seconds /ready keeps reporting a failed write

log = logging.getLogger("aigate")


class _Directory:
    """This process's view of the multiprocess directory. ``generation`` goes up whenever this
    process must reopen its files (the directory was replaced, or a write failed), which is done
    by giving prometheus_client a new process identifier (files ``<kind>_<pid>g<n>.db``)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.generation = 0
        self.inode: tuple[int, int] | None = None
        self.problem: str | None = None  # why updates are skipped right now
        self.failed_at = -FAILURE_MEMORY
        self.failure = ""

    def process_id(self) -> str:
        pid = os.getpid()
        return str(pid) if self.generation == 0 else f"{pid}g{self.generation}"

    def writable(self) -> bool:
        if self.path is None:
            return True
        try:
            problem = self._check()
        except Exception as exc:  # checking must not fail a request either
            problem = f"the metrics directory {self.path} cannot be checked ({type(exc).__name__}: {exc})"
        if problem != self.problem:
            if problem:
                log.error("metrics paused: %s", problem)
            elif self.problem:
                log.warning("metrics resumed: %s is usable again", self.path)
        self.problem = problem
        return problem is None

    def _check(self) -> str | None:
        if self.path is None:  # only called when a directory is configured
            return "no metrics directory is configured"
        try:
            st = os.stat(self.path)
        except OSError:  # gone (or a file stands where a directory on its path was)
            try:
                os.makedirs(self.path, mode=0o700, exist_ok=True)
                st = os.stat(self.path)
            except OSError as exc:
                return f"the metrics directory {self.path} is gone and cannot be recreated ({exc.strerror})"
            log.warning("the metrics directory %s was removed; recreated it (earlier counts are lost)", self.path)
        if self.inode is not None and (st.st_dev, st.st_ino) != self.inode:
            self.generation += 1  # our files went with the old directory: open new ones in this one
        self.inode = (st.st_dev, st.st_ino)
        try:
            fs = os.statvfs(self.path)
        except OSError as exc:
            return f"the metrics directory {self.path} cannot be read ({exc.strerror})"
        if fs.f_bavail * fs.f_frsize < MIN_FREE_BYTES:
            return (f"the file system of the metrics directory {self.path} has less than "
                    f"{MIN_FREE_BYTES // 2**20} MiB free")
        if not os.access(self.path, os.W_OK | os.X_OK):
            return f"the metrics directory {self.path} is not writable"
        return None

    def failed(self, exc: BaseException) -> None:
        self.failed_at, self.failure = time.monotonic(), f"{type(exc).__name__}: {exc}"
        self.generation += 1  # prometheus_client may be half reset: reopen everything next time
        log.error("metrics could not be written (%s); the request goes on without them", self.failure)

    def readiness(self) -> str | None:
        if self.path is None:
            return None
        if not self.writable():
            return self.problem
        if time.monotonic() - self.failed_at < FAILURE_MEMORY:
            return f"a metrics write failed {time.monotonic() - self.failed_at:.0f} s ago ({self.failure})"
        return None


_dir = _Directory(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None)
if _dir.path is not None:  # before any metric exists: each one's value is made by this class
    values.ValueClass = values.MultiProcessValue(  # type: ignore[no-untyped-call]  # prometheus_client: no hints
        process_identifier=_dir.process_id)

# `key` is an API key's name ("-" without one): as many values as keys configured, never a secret.
REQUESTS = Counter("aigate_requests_total", "HTTP requests answered", ["route", "model", "status", "key"])
TOKENS = Counter("aigate_tokens_total", "Tokens in prompts and completions", ["model", "kind", "key"])
# Prompt tokens taken from the engine's KV cache (a conversation's earlier turns) or evaluated anew.
PROMPT_TOKENS = Counter("aigate_prompt_tokens_total", "Prompt tokens, by whether they were reused from a cache",
                        ["model", "source"])
TIME_TO_FIRST_TOKEN = Histogram(
    "aigate_time_to_first_token_seconds", "From request to the first generated text", ["model"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
TOKENS_PER_SECOND = Histogram(
    "aigate_completion_tokens_per_second", "Decode speed of one answer, after its first token", ["model"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000))
ACTIVE_STREAMS = Gauge("aigate_active_streams", "Streaming responses in progress", multiprocess_mode="livesum")
_active_streams = 0  # this worker's count, written whole (set, not inc/dec): a skipped update cannot skew it


_children: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}


def child(metric: MetricWrapperBase, *labels: str) -> Any:
    """``metric.labels(*labels)``, looked up once: label sets are few (routes, served models, statuses,
    key names) and prometheus_client checks and locks on every call. The values behind a child follow
    a reopened file (a new process identifier), so a child stays valid."""
    found = _children.get((metric, labels))
    if found is None:
        found = _children[(metric, labels)] = metric.labels(*labels)
    return found


def safely(update: Callable[[], None]) -> None:
    """Run a metrics update unless the directory is unusable; a failure is logged, never raised."""
    if not _dir.writable():
        return
    try:
        update()
    except Exception as exc:  # OSError from the files, ValueError from a closed mmap: metrics only
        _dir.failed(exc)


class Metrics:
    """The extension's state (app.extensions[EXTENSION]). The counts themselves are this process's
    (prometheus_client's registry, or its files in PROMETHEUS_MULTIPROC_DIR), whatever the app."""

    def count(self, record: RequestRecord, ended: float, ttft: float | None) -> None:
        """A closed request's counts (the request log calls this with its line)."""
        safely(lambda: _count(record, ended, ttft))  # a metrics fault never fails the response's close


def init_app(app: Flask) -> Metrics:
    """Install the metrics: before request_log.init_app, whose closing hook counts each request."""
    installed = Metrics()
    app.extensions[EXTENSION] = installed
    return installed


def _count(r: RequestRecord, ended: float, ttft: float | None) -> None:
    child(REQUESTS, r.route, r.model, str(r.status), r.key).inc()
    if not r.model:
        return
    child(TOKENS, r.model, "prompt", r.key).inc(r.prompt_tokens)
    child(TOKENS, r.model, "completion", r.key).inc(r.completion_tokens)
    child(PROMPT_TOKENS, r.model, "reused").inc(r.cached_tokens)
    child(PROMPT_TOKENS, r.model, "evaluated").inc(r.prompt_tokens - r.cached_tokens)
    if ttft is not None and r.first_token_at is not None:
        child(TIME_TO_FIRST_TOKEN, r.model).observe(ttft)
        decode_time = ended - r.first_token_at
        if r.completion_tokens > 1 and decode_time > 0:
            child(TOKENS_PER_SECOND, r.model).observe((r.completion_tokens - 1) / decode_time)


def stream_started() -> None:
    global _active_streams
    _active_streams += 1
    safely(lambda: ACTIVE_STREAMS.set(_active_streams))


def stream_ended() -> None:
    global _active_streams
    _active_streams -= 1
    safely(lambda: ACTIVE_STREAMS.set(_active_streams))


def readiness() -> str | None:
    """None while metrics can be written; otherwise why not (for /ready)."""
    return _dir.readiness()


class _LiveGauges:
    """Gauges read from the backends at scrape time (the generation line is machine-wide)."""

    def __init__(self, stats: Iterable[tuple[str, dict[str, float]]]) -> None:
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        for backend, gauges in self.stats:
            for key, value in gauges.items():
                family = GaugeMetricFamily(f"aigate_{key}", f"{key.replace('_', ' ')} (machine-wide)",
                                           labels=["backend"])
                family.add_metric([backend], value)
                yield family


def exposition(stats: Iterable[tuple[str, dict[str, float]]]) -> bytes:
    """Raises OSError or ValueError when the directory cannot be read (the route says 503)."""
    if _dir.path is not None:
        workers = CollectorRegistry()
        MultiProcessCollector(workers, path=_dir.path)  # type: ignore[no-untyped-call]  # no hints either
        counted = generate_latest(workers)
    else:
        counted = generate_latest(REGISTRY)
    live = CollectorRegistry()
    live.register(_LiveGauges(list(stats)))
    return counted + generate_latest(live)
