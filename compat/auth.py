"""Bearer-key checks: the API keys of the /v1 routes (from `Authorization: Bearer`, or `x-api-key` as
Anthropic's clients send them), and the /metrics token."""

from __future__ import annotations

import hmac

from compat.errors import APIError
from settings import ApiKey


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
