"""Operations: GET /health (the process answers), GET /ready (every backend can serve), GET /metrics.
None of them needs an API key or waits for the model."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from flask import Blueprint, Response, jsonify, request

from compat.errors import APIError
from web import metrics
from web.auth import check_bearer
from web.context import state

bp = Blueprint("ops", __name__)
log = logging.getLogger("aigate")


@bp.get("/health")
def health() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/ready")
def ready() -> Response:
    backends = state().registry.backends
    reasons = {b.name: b.readiness() for b in backends}
    broken_metrics = metrics.readiness()
    broken_store = state().responses.readiness()  # STATE_DIR gone and not made again, a read-only disk...
    ok = all(reason is None for reason in reasons.values()) and broken_metrics is None and broken_store is None
    body: dict[str, Any] = {"status": "ready" if ok else "not ready",
                  "backends": {name: reason or "ready" for name, reason in reasons.items()}}
    upstreams = {name: state for b in backends for name, state in getattr(b, "report", dict)().items()}
    if upstreams:  # each upstream's state, requests, errors and latency, as this worker sees them
        body["upstreams"] = upstreams
    if broken_metrics:  # the requests are served meanwhile, but nothing counts them
        body["metrics"] = broken_metrics
    if broken_store:  # answers are given meanwhile, with store: false
        body["responses"] = broken_store
    response = jsonify(body)
    response.status_code = 200 if ok else 503
    return response


@bp.get("/metrics")
def prometheus_metrics() -> Response:
    app_state = state()
    if app_state.settings.metrics_token:
        check_bearer(request.headers.get("Authorization"), app_state.settings.metrics_token)
    elif not _is_loopback(request.remote_addr):
        raise APIError(403, "/metrics answers local clients only; set METRICS_TOKEN to scrape it from elsewhere.",
                       type="permission_error", code="metrics_forbidden")
    stats = [(b.name, b.stats()) for b in app_state.registry.backends]
    try:
        text = metrics.exposition(stats)
    except (OSError, ValueError) as exc:  # the multiprocess directory is gone or unreadable
        log.error("/metrics cannot be read: %s", exc)
        raise APIError(503, "Metrics are unavailable: the metrics directory cannot be read; see the server log.",
                       type="server_error", code="metrics_unavailable") from None
    return Response(text, content_type=metrics.CONTENT_TYPE)


def _is_loopback(address: str | None) -> bool:
    try:
        return ipaddress.ip_address(address or "").is_loopback
    except ValueError:
        return False
