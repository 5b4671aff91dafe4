"""A request's body as JSON (web/body.py has read it whole): whatever the Content-Type says
(curl -d sends a form type), nested no deeper than MAX_JSON_DEPTH, or an invalid_json 400."""

from __future__ import annotations

import json

from flask import request

from compat.errors import invalid
from web.context import RequestContext

MAX_JSON_DEPTH = 64  # a tool's JSON Schema nests deepest, and rarely past 20


def read_json(ctx: RequestContext, *, pass_on: bool) -> object:
    """The body. ``pass_on``: it has the shape of OpenAI's chat, completions or embeddings body, so
    the request's context keeps it for an upstream, which passes on the fields aigate does not read."""
    try:
        body = json.loads(request.get_data(cache=False))
    except (ValueError, RecursionError):
        raise invalid("We could not parse the JSON body of your request. The OpenAI API expects a "
                      "JSON payload.", code="invalid_json") from None
    if json_depth(body) > MAX_JSON_DEPTH:
        raise invalid(f"The JSON body is nested more than {MAX_JSON_DEPTH} levels deep.", code="invalid_json")
    if pass_on and isinstance(body, dict):
        ctx.body = body
    return body


def json_depth(value: object) -> int:
    """How deeply arrays and objects nest in ``value``, without recursing."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in children)
    return deepest
