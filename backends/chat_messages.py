"""A conversation's turn as OpenAI's chat format writes it, which Workers AI and every
OpenAI-compatible upstream take as it is."""

from __future__ import annotations

from typing import Any

from backends.base import Message


def message_json(m: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                             for c in m.tool_calls]
    # An empty id or name says nothing, and a server that checks them (OpenAI's name is 1 to 64
    # characters) would refuse a request aigate accepted: left out, as when the client sent none.
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.name:
        out["name"] = m.name
    return out
