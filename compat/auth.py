"""Bearer-key check for the /v1 routes."""

from __future__ import annotations

import hmac

from compat.errors import APIError


def check_bearer(authorization: str | None, keys: tuple[str, ...]) -> None:
    """Raise a 401 unless the header carries one of ``keys``; no keys means no auth.

    Every key is compared, in constant time, so the answer's timing tells nothing about which
    keys exist or how much of one was right.
    """
    if not keys:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "You didn't provide an API key. Send it in an Authorization header: "
                            "'Authorization: Bearer YOUR_KEY'.", code="invalid_api_key")
    given = token.strip().encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.encode())
    if not matched:
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
