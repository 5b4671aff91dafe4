"""The sampling controls a request asks for beyond temperature, top_p, stop and max_tokens (n, logprobs,
seed, logit_bias, the penalties), and the rule that each is honoured or refused, never dropped: a model that
lacks one (its ModelInfo.controls) gets a 400 naming the models here that have it. Zeros and nulls ask for
nothing (SDKs send presence_penalty: 0 on every request); tool_choice is not refused (a hint where not enforced)."""

from __future__ import annotations

from collections.abc import Mapping

from backends.base import ChatRequest, Control
from backends.registry import Registry, Route
from compat.errors import invalid

WHAT = {"logprobs": "log probabilities", "seed": "a seed", "logit_bias": "logit_bias",
        "n": "more than one choice", "penalties": "presence and frequency penalties"}


def asked(request: ChatRequest, params: Mapping[Control, str] | None = None) -> dict[Control, str]:
    """The controls ``request`` asks for, each with the field that asked (``params`` renames them where the
    endpoint names them otherwise: the Responses API's ``include``)."""
    return {control: (params or {}).get(control, param) for control, param in request.controls_asked.items()}


def lacks(route: Route, wanted: Mapping[Control, str]) -> list[Control]:
    """Of the controls wanted, those the route's model does not honour."""
    return [c for c in wanted if c not in route.info.controls]


def refuse(control: Control, param: str, model: str, registry: Registry) -> None:
    """The 400 for a model that does not honour ``control``."""
    able = sorted({m.id for m in registry.models() if control in m.controls})
    which = ("Models on this server that support it: " + ", ".join(able) + "." if able
             else "No model on this server supports it.")
    code = "unsupported_value" if control == "n" else "unsupported_parameter"
    raise invalid(f"{param} is not supported with the model {model!r}: it cannot honour {WHAT[control]}, and a "
                  f"sampling control is honoured or refused, never ignored. {which}", param, code)
