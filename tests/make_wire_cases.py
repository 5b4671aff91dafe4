"""Writes tests/data/wire_cases.json: what the request parsers answer to bodies with one field broken,
recorded from the hand-written parsers before the wire types were declared (commit fe2a595), so that
tests/unit/test_wire.py can hold the declared ones to the same `param` and `code` for every case.

Each base body is valid; each case sets one path (every field of the base, and the optional fields
the base leaves out) to one probe value, or removes it. Run from the repository root:
    .venv/bin/python -m tests.make_wire_cases
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from compat.errors import APIError
from compat.requests import Limits, parse_chat, parse_completion
from compat.responses_api import parse_responses

try:
    from compat.requests import parse_embeddings
except ImportError:  # before the declarations, the route held it
    from web.routes.embeddings import parse_embeddings  # type: ignore[attr-defined,no-redef]

OUT = Path(__file__).resolve().parent / "data" / "wire_cases.json"
GONE = "<removed>"
PROBES: list[Any] = [GONE, None, 0, -1, 1, 2, 5, 1.5, 3.0, True, False, "", "x", "auto", "none", "required", [], [1],
                     ["x"], ["a", "b", "c", "d", "e"], {}, {"a": 1}, {"type": "text"}, {"type": "function"},
                     float("nan"), 1e30]
IMAGE = "data:image/png;base64,iVBORw0KGgo="
PROBES += [{"type": "image_url", "image_url": {"url": IMAGE}}, {"type": "image_url", "image_url": "https://x/y.png"},
           {"type": "input_audio"}, {"role": "user", "content": "x"}, {"type": "image_url"},
           {"type": "image_url", "image_url": {"detail": "low"}}]
CHAT = {
    "model": "m", "max_tokens": 8, "temperature": 0.5, "stop": ["\n"], "stream": True,
    "stream_options": {"include_usage": True},
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"},
                                     {"type": "image_url", "image_url": {"url": IMAGE}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1", "name": "f"},
    ],
    "tools": [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}],
    "tool_choice": {"type": "function", "function": {"name": "f"}},
    "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}},
}
CHAT_EXTRA = ["n", "user", "logprobs", "seed", "presence_penalty", "frequency_penalty", "top_p",
              "max_completion_tokens", "functions", "function_call", "parallel_tool_calls", "metadata"]
LEGACY = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
          "functions": [{"name": "f", "description": "d", "parameters": {}}], "function_call": {"name": "f"}}
TEXT_ONLY = {"model": "t", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]},
                                      {"role": "assistant", "content": [{"type": "text", "text": "b"}]}]}
COMPLETION = {"model": "m", "prompt": ["a", "b"], "max_tokens": 8, "echo": True, "suffix": "s", "stop": "\n",
              "stream": True, "stream_options": {"include_usage": False}}
COMPLETION_EXTRA = ["n", "best_of", "logprobs", "user", "temperature", "top_p", "seed", "presence_penalty",
                    "frequency_penalty"]
RESPONSES = {
    "model": "m", "instructions": "be brief", "max_output_tokens": 8, "temperature": 0.5, "store": False,
    "stream": True, "metadata": {"a": "b"}, "parallel_tool_calls": False,
    "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"},
                                                              {"type": "input_image", "image_url": IMAGE}]},
              {"type": "function_call", "name": "f", "call_id": "c1", "arguments": "{}"},
              {"type": "function_call_output", "call_id": "c1", "output": "42"}],
    "tools": [{"type": "function", "name": "f", "description": "d", "parameters": {"type": "object"}},
              {"type": "web_search"}],
    "tool_choice": {"type": "function", "name": "f"},
    "text": {"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}}},
}
RESPONSES_EXTRA = ["n", "user", "top_p", "background", "conversation", "prompt", "reasoning", "include"]
EMBEDDING = {"model": "m", "input": ["a", "b"], "encoding_format": "base64", "dimensions": 8}
EMBEDDING_EXTRA = ["user", "n"]
LIMITS = Limits(max_messages=6, max_input_chars=400, max_tokens=50, image_models=frozenset({"m"}),
                max_image_bytes=64)
BASES: dict[str, tuple[str, Any, list[str]]] = {
    "chat": ("chat", CHAT, CHAT_EXTRA), "legacy": ("chat", LEGACY, []), "text_only": ("chat", TEXT_ONLY, []),
    "completion": ("completion", COMPLETION, COMPLETION_EXTRA), "embedding": ("embedding", EMBEDDING, EMBEDDING_EXTRA),
    "responses": ("responses", RESPONSES, RESPONSES_EXTRA)}
WHOLE: list[Any] = [None, [], "x", 1, {}]  # bodies that are not an object, or an empty one
PARSERS = {"chat": lambda body: parse_chat(body, LIMITS), "completion": lambda body: parse_completion(body, LIMITS),
           "embedding": parse_embeddings, "responses": lambda body: parse_responses(body, LIMITS)}


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            out += paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            out += paths(child, (*prefix, i))
    return out


def with_value(body: Any, path: tuple[Any, ...], value: Any) -> Any:
    body = copy.deepcopy(body)
    where = body
    for key in path[:-1]:
        where = where[key]
    if value == GONE and not isinstance(value, bool):
        del where[path[-1]]
    else:
        where[path[-1]] = value
    return body


def answer(parser: str, body: Any) -> dict[str, Any]:
    try:
        PARSERS[parser](body)
    except APIError as err:
        return {"status": err.status, "param": err.param, "code": err.code}
    return {"status": 200}


def cases() -> list[tuple[str, str, Any, Any]]:
    """(base, parser, where, body): where is [path, probe index] or the index in WHOLE."""
    out = []
    for name, (parser, base, extra) in BASES.items():
        for path in paths(base) + [(field,) for field in extra]:
            for i, probe in enumerate(PROBES):
                if probe == GONE and not isinstance(probe, bool) and len(path) == 1 and path[0] in extra:
                    continue
                out.append((name, parser, [list(path), i], with_value(base, path, probe)))
        out += [(name, parser, i, body) for i, body in enumerate(WHOLE)]
    return out


def main() -> None:
    rows = []
    for name, parser, where, body in cases():
        got = answer(parser, body)
        rows.append([name, where, got["status"], got.get("param"), got.get("code")])
    OUT.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n", encoding="utf-8")
    print(len(rows), "cases,", sum(r[2] == 400 for r in rows), "of them 400s")


if __name__ == "__main__":
    main()
