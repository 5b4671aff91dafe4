"""An APIError (compat/errors.py: the wire's error object) as the HTTP response that carries it."""

from __future__ import annotations

from flask import Response, jsonify

from compat.errors import APIError


def error_response(err: APIError) -> Response:
    response = jsonify(err.body())
    response.status_code = err.status
    response.headers.update(err.headers)
    return response
