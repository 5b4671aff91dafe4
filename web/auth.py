"""Bearer-key checks: the API keys of the /v1 routes (from `Authorization: Bearer`, or `x-api-key` as
Anthropic's clients send them; a step of its own, before the body is read), and the /metrics token."""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Any, cast
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from werkzeug.wsgi import get_path_info

from compat.errors import APIError
from config.settings import ApiKey
from web.body import drop_body

# Where KeyCheck leaves its verdict in the WSGI environ, for the request log's first hook.
KEY = "aigate.key"  # the ApiKey the request carries (None: no API_KEYS)
REFUSED = "aigate.key_refused"  # the 401 to answer


class KeyCheck:
    """WSGI middleware, the step before the body reader: a /v1 request's key is checked from its headers
    alone, and the body of a request that may not go on is never read. A request refused here goes on
    with an empty body (the connection is closed after its answer when it had one), so that Flask
    answers its 401 like every error (request id, CORS headers, log line, metrics). The body is read
    only for a /v1 request with a good key (or any /v1 request when no API_KEYS are set): no other
    route takes one."""

    def __init__(self, app: WSGIApplication, keys: tuple[ApiKey, ...]) -> None:
        self.app, self.keys = app, keys

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if not takes_key(environ):
            drop_body(environ)  # nothing else takes a body (a preflight, /health, /metrics, the playground...)
            return self.app(environ, start_response)
        try:
            environ[KEY] = authenticate(environ.get("HTTP_AUTHORIZATION"), self.keys, environ.get("HTTP_X_API_KEY"))
        except APIError as refused:
            environ[REFUSED] = refused
            drop_body(environ)
        return self.app(environ, start_response)


def takes_key(environ: dict[str, Any]) -> bool:
    """Is this a /v1 request, other than a CORS preflight? The path as Flask will route it."""
    path = "/" + get_path_info(environ).lstrip("/")
    return path.startswith("/v1/") and environ.get("REQUEST_METHOD") != "OPTIONS"


def key_of(environ: dict[str, Any]) -> ApiKey | None:
    """The key KeyCheck found for this /v1 request, or its 401. A request it did not see is refused:
    serving one unchecked would be worse than a 500."""
    refused = environ.get(REFUSED)
    if refused is not None:
        raise refused
    if KEY not in environ:
        raise RuntimeError("a /v1 request reached the app without the key check (web.auth.KeyCheck)")
    return cast("ApiKey | None", environ[KEY])


def authenticate(authorization: str | None, keys: tuple[ApiKey, ...], api_key: str | None = None) -> ApiKey | None:
    """The key the request carries (a 401 if none matches); None when no keys are configured. A bearer
    Authorization header is read first, else the ``api_key`` header (x-api-key: what the Anthropic SDKs
    and Claude Code send)."""
    if not keys:
        return None
    if api_key and not _is_bearer(authorization):
        authorization = "Bearer " + api_key
    return keys[_match(authorization, tuple(k.secret for k in keys))]


def _is_bearer(authorization: str | None) -> bool:
    return (authorization or "").partition(" ")[0].lower() == "bearer"


def allowed(key: ApiKey | None, *names: str) -> bool:
    """May ``key`` (the request's; None: no API_KEYS) use the model known by any of ``names`` (the
    name asked for, its id)?"""
    return key is None or key.allows(*names)


def check_bearer(authorization: str | None, secret: str) -> None:
    _match(authorization, (secret,))


def _match(authorization: str | None, secrets: tuple[str, ...]) -> int:
    """The index of the secret the header carries. Every secret is compared, in constant time, so
    the answer's timing tells nothing about which keys exist or how much of one was right."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "You didn't provide an API key. Send it in an Authorization header: "
                            "'Authorization: Bearer YOUR_KEY' (or an 'x-api-key: YOUR_KEY' header).",
                       code="invalid_api_key")
    given = token.strip().encode()
    found = -1
    for i, secret in enumerate(secrets):
        if hmac.compare_digest(given, secret.encode()):
            found = i
    if found < 0:
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    return found
