"""Bearer-key checks: the API keys of the /v1 routes, and the /metrics token."""

from __future__ import annotations

import hmac

from compat.errors import APIError
from settings import ApiKey


def authenticate(authorization: str | None, keys: tuple[ApiKey, ...]) -> ApiKey | None:
    """The key the header carries (a 401 if none matches); None when no keys are configured."""
    if not keys:
        return None
    return keys[_match(authorization, tuple(k.secret for k in keys))]


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
                            "'Authorization: Bearer YOUR_KEY'.", code="invalid_api_key")
    given = token.strip().encode()
    found = -1
    for i, secret in enumerate(secrets):
        if hmac.compare_digest(given, secret.encode()):
            found = i
    if found < 0:
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    return found
