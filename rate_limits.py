"""Per-key rate limits on /v1: requests per minute through Flask-Limiter (a moving window), tokens
per minute on the same storage (a fixed window charged with each answer's usage when it ends).
``memory://`` counts per worker; ``redis://`` shares one count between every worker and host.

A key is named by its ApiKey.name (never the secret); without API keys a client is its address.
If the storage fails, requests are served (and a warning logged) rather than refused."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from flask import Flask, Response, g, request
from flask_limiter import HeaderNames, Limiter, RateLimitExceeded
from limits import RateLimitItemPerMinute
from limits.strategies import FixedWindowRateLimiter

from compat.errors import APIError, error_response, retry_headers
from request_log import RequestRecord
from settings import ApiKey, Settings

log = logging.getLogger("aigate")


@dataclass(frozen=True)
class Quota:
    who: str  # the counters' key
    requests_per_minute: int
    tokens_per_minute: int


def install(app: Flask, settings: Settings) -> None:
    """Call after the authentication hook is installed: the limits read the key it found."""

    def quota() -> Quota | None:
        if not request.path.startswith("/v1/"):
            return None
        key: ApiKey | None = g.get("api_key")
        if key is not None:
            return Quota(key.name, key.requests_per_minute, key.tokens_per_minute)
        return Quota("ip:" + (request.remote_addr or "-"), settings.rate_limit_rpm, settings.rate_limit_tpm)

    def requests_limit() -> str:
        q = quota()
        return f"{q.requests_per_minute}/minute" if q and q.requests_per_minute else ""

    # A Redis that hangs must not hang requests: give up on it after a second and count in memory.
    redis_options = {"socket_connect_timeout": 1, "socket_timeout": 1}
    limiter = Limiter(lambda: quota().who, app=app, application_limits=[requests_limit],  # type: ignore[union-attr]
                      storage_uri=settings.ratelimit_storage_uri, strategy="moving-window", key_prefix="aigate",
                      storage_options=redis_options if settings.ratelimit_storage_uri.startswith("redis") else {},
                      headers_enabled=True, in_memory_fallback_enabled=True, swallow_errors=True,
                      # Ours is rounded up (Flask-Limiter's may say 0); its own goes under another name.
                      header_name_mapping={HeaderNames.RETRY_AFTER: "X-RateLimit-Retry-After"})

    def tokens() -> FixedWindowRateLimiter:
        """On Flask-Limiter's storage, or its in-memory fallback while that storage is down."""
        return FixedWindowRateLimiter(limiter.limiter.storage)

    @app.errorhandler(RateLimitExceeded)
    def too_many_requests(err: RateLimitExceeded) -> Response:
        limit = limiter.current_limit
        wait = limit.reset_at - time.time() if limit else 60.0
        return error_response(_exceeded("requests", "RPM", quota(), err.limit.limit.amount, wait))

    @app.before_request
    def check_tokens() -> None:
        q = quota()
        if q is None or not q.tokens_per_minute:
            return
        item = RateLimitItemPerMinute(q.tokens_per_minute)
        try:
            counter = tokens()
            if counter.test(item, "tokens", q.who):
                return
            wait = counter.get_window_stats(item, "tokens", q.who).reset_time - time.time()
        except Exception as exc:  # the storage is down: serve rather than refuse
            log.warning("rate-limit storage failed (%s); tokens per minute are not checked", type(exc).__name__)
            return
        raise _exceeded("tokens", "TPM", q, q.tokens_per_minute, wait)

    @app.after_request
    def charge_tokens(response: Response) -> Response:
        q, record = quota(), g.get("record")
        if q is not None and q.tokens_per_minute and record is not None:
            item = RateLimitItemPerMinute(q.tokens_per_minute)
            response.call_on_close(lambda: _charge(tokens(), item, q.who, record))
        return response


def _charge(tokens: FixedWindowRateLimiter, item: RateLimitItemPerMinute, who: str, record: RequestRecord) -> None:
    """Once the answer has ended (a stream's usage is known only then)."""
    used = record.prompt_tokens + record.completion_tokens
    if used:
        try:
            tokens.hit(item, "tokens", who, cost=used)
        except Exception as exc:
            log.warning("rate-limit storage failed (%s); %d tokens went uncounted", type(exc).__name__, used)


def _exceeded(kind: str, unit: str, q: Quota | None, limit: int, wait: float) -> APIError:
    wait = min(max(wait, 1.0), 60.0)  # a one-minute window frees room within the minute
    return APIError(429, f"Rate limit reached for {kind} per minute ({unit}) on {q.who if q else 'this client'}: "
                         f"limit {limit}. Please try again in {math.ceil(wait)}s.",
                    type=kind, code="rate_limit_exceeded", headers=retry_headers(wait))
