"""Prometheus metrics. Under gunicorn every worker writes its own files in
PROMETHEUS_MULTIPROC_DIR (set by gunicorn.conf.py before anything imports prometheus_client),
and a scrape of any worker adds them all up."""

from __future__ import annotations

import os
from collections.abc import Iterable

from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

CONTENT_TYPE = CONTENT_TYPE_LATEST

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


class _LiveGauges:
    """Gauges read from the backends at scrape time (the generation line is machine-wide)."""

    def __init__(self, stats: Iterable[tuple[str, dict[str, float]]]) -> None:
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        for backend, values in self.stats:
            for key, value in values.items():
                family = GaugeMetricFamily(f"aigate_{key}", f"{key.replace('_', ' ')} (machine-wide)",
                                           labels=["backend"])
                family.add_metric([backend], value)
                yield family


def exposition(stats: Iterable[tuple[str, dict[str, float]]]) -> bytes:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        workers = CollectorRegistry()
        MultiProcessCollector(workers)
        counted = generate_latest(workers)
    else:
        counted = generate_latest(REGISTRY)
    live = CollectorRegistry()
    live.register(_LiveGauges(list(stats)))  # type: ignore[arg-type]
    return counted + generate_latest(live)
