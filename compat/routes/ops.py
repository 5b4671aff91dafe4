"""Operations: GET /health (the process answers), GET /ready (every backend can serve), GET /metrics.
None of them needs an API key or waits for the model."""

from __future__ import annotations

import ipaddress

from flask import Blueprint, Response, current_app, jsonify, request

import metrics
from compat.auth import check_bearer
from compat.errors import APIError

bp = Blueprint("ops", __name__)


@bp.get("/health")
def health():
    return jsonify({"status": "ok"})


@bp.get("/ready")
def ready():
    backends = current_app.extensions["aigate"].registry.backends
    reasons = {b.name: b.readiness() for b in backends}
    ok = all(reason is None for reason in reasons.values())
    body = {"status": "ready" if ok else "not ready",
            "backends": {name: reason or "ready" for name, reason in reasons.items()}}
    response = jsonify(body)
    response.status_code = 200 if ok else 503
    return response


@bp.get("/metrics")
def prometheus_metrics():
    state = current_app.extensions["aigate"]
    if state.settings.metrics_token:
        check_bearer(request.headers.get("Authorization"), state.settings.metrics_token)
    elif not _is_loopback(request.remote_addr):
        raise APIError(403, "/metrics answers local clients only; set METRICS_TOKEN to scrape it from elsewhere.",
                       type="permission_error", code="metrics_forbidden")
    stats = [(b.name, b.stats()) for b in state.registry.backends]
    return Response(metrics.exposition(stats), content_type=metrics.CONTENT_TYPE)


def _is_loopback(address: str | None) -> bool:
    try:
        return ipaddress.ip_address(address or "").is_loopback
    except ValueError:
        return False
