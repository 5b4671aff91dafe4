"""GLM-4's own tool-calling format.

The tools go into a system turn, each as its JSON description under a ``## name`` heading; the
model answers a tool call with the function's name on its turn's metadata line (right after
<|assistant|>) and the arguments as a JSON object on the next line, then ends the turn with
<|observation|>. The result comes back as an <|observation|> turn. A plain answer has an empty
metadata line, as with ChatGLM3.
"""

from __future__ import annotations

import json
import secrets

from backends.base import Tool, ToolCall
from backends.chatglm.chatglm3_tools import call_turn

TOOLS_PROMPT = ("你是一个名为 GLM-4 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具")
CALL_HINT = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"


def tools_system_prompt(tools: tuple[Tool, ...]) -> str:
    parts = [TOOLS_PROMPT]
    for t in tools:
        described = {"name": t.name, "description": t.description, "parameters": t.parameters}
        parts.append(f"\n\n## {t.name}\n\n{json.dumps(described, indent=4, ensure_ascii=False)}{CALL_HINT}")
    return "".join(parts)


def render_call(call: ToolCall) -> str:
    """An earlier call's arguments, written back the way GLM-4 writes them (its name is the metadata)."""
    try:
        return json.dumps(json.loads(call.arguments or "{}"), ensure_ascii=False)
    except ValueError:
        return call.arguments


def parse_call(name: str, body: str) -> ToolCall | None:
    """The call in a tool turn, or None if it is not one the client could use."""
    turn = call_turn(name, body)
    if turn is None:
        return None
    name, source = turn
    try:
        arguments = json.loads(source)
    except (ValueError, RecursionError):
        return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall("call_" + secrets.token_hex(12), name, json.dumps(arguments, ensure_ascii=False))
