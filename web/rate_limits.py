"""Per-key rate limits on /v1: requests per minute through Flask-Limiter (a moving window), tokens
per minute on the same storage (a fixed window: a generation's prompt and max_tokens are reserved
when it starts, refused if they do not fit, and its real usage settles them when it ends).
``memory://`` counts per worker; ``redis://`` shares one count between every worker and host.

A key is named by its ApiKey.name (never the secret); without API keys a client is its address.
If the storage fails, requests are served (and a warning logged) rather than refused."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any, cast

from flask import Flask, Response, request
from flask_limiter import HeaderNames, Limiter, RateLimitExceeded
from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage, Storage, storage_from_string
from limits.strategies import FixedWindowRateLimiter

from compat.errors import APIError, retry_headers
from config.settings import Settings
from web.context import Quota, RequestContext, context, context_if_any, state
from web.errors import error_response

log = logging.getLogger("aigate")


EXTENSION = "aigate.rate_limits"


class RateLimits:
    """The extension's state (app.extensions[EXTENSION]): the limits of a client without an API key.
    The token budgets are in state(app).budgets, where generation.start reserves from them."""

    def __init__(self, settings: Settings) -> None:
        self.rpm, self.tpm = settings.rate_limit_rpm, settings.rate_limit_tpm

    def quota(self, ctx: RequestContext) -> Quota | None:
        """The request's quota (None: not a /v1 path), worked out once: the limiter and the token
        hooks each ask. A client without an API key is its address."""
        if not ctx.quota_known:
            ctx.quota, ctx.quota_known = self._quota(ctx), True
        return ctx.quota

    def _quota(self, ctx: RequestContext) -> Quota | None:
        if not request.path.startswith("/v1/"):
            return None
        key = ctx.key
        if key is not None:
            return Quota(key.name, key.requests_per_minute, key.tokens_per_minute)
        return Quota("ip:" + (request.remote_addr or "-"), self.rpm, self.tpm)


def init_app(app: Flask) -> RateLimits:
    """Install the limits on ``app`` after the request log (request_log.init_app): they read the key
    its hook found. The token budgets, which generation.start reserves and a closing hook here settles,
    go to ``state(app).budgets`` (None when no key has tokens per minute)."""
    app_state = state(app)
    limits = app.extensions[EXTENSION] = RateLimits(app_state.settings)
    app_state.budgets = _install(app, app_state.settings, limits.quota)
    return limits


def _install(app: Flask, settings: Settings,
             quota: Callable[[RequestContext], Quota | None]) -> TokenBudgets | None:
    def requests_limit() -> str:
        q = quota(context())
        return f"{q.requests_per_minute}/minute" if q and q.requests_per_minute else ""

    # A Redis that hangs must not hang requests: give up on it after a second and count in memory.
    redis = settings.ratelimit_storage_uri.startswith("redis")
    storage_options: dict[str, Any] = {"socket_connect_timeout": 1, "socket_timeout": 1} if redis else {}
    if not (settings.rate_limit_rpm or any(key.requests_per_minute for key in settings.api_keys)):
        # No requests-per-minute anywhere: Flask-Limiter's hooks (a fifth of a request's CPU in a
        # profile) would find no limit and add no header, so they are not installed.
        tokens = TokenBudget(cast(Storage, storage_from_string(settings.ratelimit_storage_uri, **storage_options)))
    else:
        limiter = Limiter(lambda: getattr(quota(context()), "who", "-"), app=app, application_limits=[requests_limit],
                          storage_uri=settings.ratelimit_storage_uri, strategy="moving-window", key_prefix="aigate",
                          storage_options=storage_options, headers_enabled=True, in_memory_fallback_enabled=True,
                          swallow_errors=True,
                          # Ours is rounded up (Flask-Limiter's may say 0); its own goes under another name.
                          header_name_mapping={HeaderNames.RETRY_AFTER: "X-RateLimit-Retry-After"})
        tokens = TokenBudget(limiter.storage)

        @limiter.request_filter
        def without_request_limit() -> bool:
            """A client without a requests-per-minute limit is not counted (no limit, no header)."""
            q = quota(context())
            return q is None or not q.requests_per_minute

        @app.errorhandler(RateLimitExceeded)
        def too_many_requests(err: RateLimitExceeded) -> Response:
            try:
                current = limiter.current_limit
                wait = current.reset_at - time.time() if current else 60.0
            except Exception:  # the storage failed since the hit: the answer is still a 429
                wait = 60.0
            return error_response(_exceeded("requests", "RPM", quota(context()), err.limit.limit.amount, wait))

    if not (settings.rate_limit_tpm or any(key.tokens_per_minute for key in settings.api_keys)):
        return None  # no tokens-per-minute anywhere: nothing to check, reserve or settle on any request

    @app.before_request
    def check_tokens() -> None:
        q = quota(context())
        if q is None or not q.tokens_per_minute:
            return
        item = RateLimitItemPerMinute(q.tokens_per_minute)
        wait = tokens.spent(item, q.who)
        if wait is not None:
            raise _exceeded("tokens", "TPM", q, q.tokens_per_minute, wait)

    budgets = TokenBudgets(tokens, quota)

    @app.after_request
    def charge_tokens(response: Response) -> Response:
        ctx = context_if_any()
        q = quota(ctx) if ctx is not None else None
        if ctx is not None and q is not None and q.tokens_per_minute:
            record = ctx.record
            # Once the answer has ended (a stream's usage is known only then), finished or not.
            response.call_on_close(lambda: budgets.settle(q, record.tokens_used - ctx.reserved_tokens))
        return response

    return budgets


class TokenBudgets:
    """The keys' tokens per minute, as a generation uses them: ``reserve`` what a request's
    generation may cost before it starts (generation.start), so that requests running at once cannot all
    spend the same tokens; ``settle`` with its real usage once the answer has ended. What does not fit
    in what is left of the minute is refused (what never fits, said so)."""

    def __init__(self, budget: TokenBudget, quota: Callable[[RequestContext], Quota | None]) -> None:
        self._budget, self._quota = budget, quota

    def reserve(self, ctx: RequestContext, most: int) -> None:
        q = self._quota(ctx)
        if q is None or not q.tokens_per_minute:
            return
        if most > q.tokens_per_minute:
            raise _too_large(q, most)
        wait = self._budget.reserve(RateLimitItemPerMinute(q.tokens_per_minute), q.who, most)
        if wait is not None:
            raise _exceeded("tokens", "TPM", q, q.tokens_per_minute, wait)

    def settle(self, q: Quota, used: int) -> None:
        """``used`` more tokens than reserved for the quota ``q`` (fewer than none gives part of the
        reservation back). Called when the answer has ended, after the request's context is gone."""
        if q.tokens_per_minute:
            self._budget.charge(RateLimitItemPerMinute(q.tokens_per_minute), q.who, used)


class TokenBudget:
    """Tokens per minute, a fixed window on the rate-limit storage. While that storage fails,
    counts go to memory for RETRY_AFTER_FAILURE seconds (Flask-Limiter does the same for requests,
    but only notices a failure on its own calls, which a key without a request limit never makes)."""

    RETRY_AFTER_FAILURE = 30.0

    def __init__(self, storage: Storage) -> None:
        self.shared = FixedWindowRateLimiter(storage)
        self.local = FixedWindowRateLimiter(MemoryStorage())
        self.down_until = 0.0

    def spent(self, item: RateLimitItemPerMinute, who: str) -> float | None:
        """None while there is budget left, else the seconds until the window turns."""
        def check(counter: FixedWindowRateLimiter) -> float | None:
            if counter.test(item, "tokens", who):
                return None
            return counter.get_window_stats(item, "tokens", who).reset_time - time.time()
        return cast("float | None", self._use(check))

    def reserve(self, item: RateLimitItemPerMinute, who: str, most: int) -> float | None:
        """Take ``most`` tokens if the window still holds them (None), else give them back and say
        how many seconds until it turns. One increment, so parallel requests cannot both fit in
        the same room."""
        def take(counter: FixedWindowRateLimiter) -> float | None:
            key, expiry = item.key_for("tokens", who), item.get_expiry()
            if counter.storage.incr(key, expiry, amount=most) <= item.amount:
                return None
            counter.storage.incr(key, expiry, amount=-most)
            return counter.get_window_stats(item, "tokens", who).reset_time - time.time()
        return cast("float | None", self._use(take))

    def charge(self, item: RateLimitItemPerMinute, who: str, used: int) -> None:
        """Add ``used`` tokens; fewer than none gives back part of a reservation, but never more than
        the window holds (if the minute turned since, the new window owes nothing back)."""
        def hit(counter: FixedWindowRateLimiter) -> None:
            key, expiry = item.key_for("tokens", who), item.get_expiry()
            count = counter.storage.incr(key, expiry, amount=used)
            if count < 0:
                counter.storage.incr(key, expiry, amount=-count)
        if used:
            self._use(hit)

    def _use(self, action: Callable[[FixedWindowRateLimiter], Any]) -> Any:
        if time.monotonic() >= self.down_until:
            try:
                return action(self.shared)
            except Exception as exc:  # any storage failure: count locally rather than refuse
                log.warning("rate-limit storage failed (%s); counting tokens in this worker for %.0f s",
                            type(exc).__name__, self.RETRY_AFTER_FAILURE)
                self.down_until = time.monotonic() + self.RETRY_AFTER_FAILURE
        return action(self.local)


def _too_large(q: Quota, most: int) -> APIError:
    """A request that could not fit in a whole minute's budget: waiting will not help (as OpenAI
    words it; x-should-retry tells the SDKs not to resend it)."""
    return APIError(429, f"Request too large for tokens per minute (TPM) on {q.who}: limit {q.tokens_per_minute}, "
                         f"requested about {most} (the prompt and max_tokens; a request without max_tokens "
                         "reserves what the model could answer). Lower max_tokens or shorten the prompt.",
                    type="tokens", code="rate_limit_exceeded", headers={"x-should-retry": "false"})


def _exceeded(kind: str, unit: str, q: Quota | None, limit: int, wait: float) -> APIError:
    wait = min(max(wait, 1.0), 60.0)  # a one-minute window frees room within the minute
    return APIError(429, f"Rate limit reached for {kind} per minute ({unit}) on {q.who if q else 'this client'}: "
                         f"limit {limit}. Please try again in {math.ceil(wait)}s.",
                    type=kind, code="rate_limit_exceeded", headers=retry_headers(wait))
