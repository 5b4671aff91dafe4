"""Structured outputs: `text.format` (Responses) read into a JsonFormat (chat's `response_format` is
declared in compat/wire.py and read by compat/requests.py), and the rule that a schema is honoured or refused,
never dropped: a model that cannot constrain its output gets a 400 naming the models here that can."""

from __future__ import annotations

from typing import Any

from backends.base import JsonFormat
from backends.registry import Registry, Route
from compat.errors import invalid

KINDS = "text, json_object or json_schema"


def text_format(raw: Any) -> JsonFormat | None:
    """Responses' `text`: {format: {type: text} | {type: json_object} | {type: json_schema, name, schema}}."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise invalid("text must be an object.", "text", "invalid_type")
    fmt = raw.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return JsonFormat(None, param="text.format")
    if kind == "json_schema":
        return _with_schema(fmt, "text.format")
    raise invalid(f"text.format must be an object with type {KINDS}.", "text.format", "invalid_value")


def _with_schema(spec: dict[str, Any], param: str) -> JsonFormat:
    schema, name, strict = spec.get("schema"), spec.get("name", "response"), spec.get("strict")
    if not isinstance(schema, dict):
        raise invalid(f"{param}.schema must be a JSON Schema object.", f"{param}.schema", "invalid_type")
    if not isinstance(name, str):
        raise invalid(f"{param}.name must be a string.", f"{param}.name", "invalid_type")
    if strict is not None and not isinstance(strict, bool):
        raise invalid(f"{param}.strict must be a boolean.", f"{param}.strict", "invalid_type")
    return JsonFormat(schema, name, param=param.split(".json_schema")[0], strict=bool(strict))


def supports(route: Route) -> bool:
    return any(m.id == route.model_id and m.structured_outputs for m in route.backend.models())


def refuse(fmt: JsonFormat, model: str, registry: Registry) -> None:
    """The 400 for a model that cannot honour a JSON format."""
    able = sorted({m.id for m in registry.models() if m.structured_outputs})
    which = ("Models on this server that support it: " + ", ".join(able) + "." if able
             else "No model on this server supports it.")
    kind = "json_schema" if fmt.schema is not None else "json_object"
    raise invalid(f"{fmt.param} of type {kind!r} is not supported with the model {model!r}: it cannot constrain "
                  f"its output to JSON, and a schema is honoured or refused, never ignored. {which}",
                  fmt.param, "unsupported_value")
