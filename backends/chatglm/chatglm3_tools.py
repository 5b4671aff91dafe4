"""ChatGLM3's own tool-calling format.

The tools go into a system turn as JSON; the model answers a tool call with the tool's name on the
first line of its turn (ChatGLM3's "metadata" line) and the arguments as Python keyword arguments,
```python\\ntool_call(city="Paris")\\n```, then ends the turn with <|observation|>. A plain answer
has an empty first line. Arguments are read with ast (literals only), never evaluated.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
from collections.abc import Callable

from backends.base import Tool, ToolCall

TOOLS_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:\n"
_FENCED = re.compile(r"```[^\n]*\n(.*?)\n?```", re.S)


def tools_system_prompt(tools: tuple[Tool, ...]) -> str:
    described = [{"name": t.name, "description": t.description, "parameters": t.parameters} for t in tools]
    return TOOLS_PROMPT + json.dumps(described, indent=4, ensure_ascii=False)


def render_call(call: ToolCall) -> str:
    """An earlier call, written back the way ChatGLM3 writes one."""
    try:
        arguments = json.loads(call.arguments or "{}")
    except ValueError:
        arguments = None
    kwargs = ", ".join(f"{k}={v!r}" for k, v in arguments.items()) if isinstance(arguments, dict) else call.arguments
    return f"```python\ntool_call({kwargs})\n```"


def call_turn(name: str, body: str) -> tuple[str, str] | None:
    """A tool turn's function name and its arguments' source (fenced or not), or None for a name no
    client could call. ChatGLM3 and GLM-4 differ only in how they write the arguments."""
    name = name.strip()
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        return None
    fenced = _FENCED.search(body)
    return name, (fenced.group(1) if fenced else body).strip()


class _JsonWords(ast.NodeTransformer):
    """JSON's true, false and null, which a model writes inside a value as often as Python's True, False
    and None: read as the constants they mean (literal_eval takes no names)."""

    WORDS = {"true": True, "false": False, "null": None}

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in self.WORDS:
            return ast.copy_location(ast.Constant(self.WORDS[node.id]), node)
        return node


def parse_call(name: str, body: str) -> ToolCall | None:
    """The call in a tool turn, or None if it is not one the client could use."""
    turn = call_turn(name, body)
    if turn is None:
        return None
    name, source = turn
    try:
        node = _JsonWords().visit(ast.parse(source, mode="eval").body)
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "tool_call"
                and not node.args):
            return None
        if len(node.keywords) == 1 and node.keywords[0].arg is None:  # tool_call(**{...}): the arguments whole
            arguments = ast.literal_eval(node.keywords[0].value)
            if not isinstance(arguments, dict) or not all(isinstance(k, str) for k in arguments):
                return None
        elif all(k.arg for k in node.keywords):
            arguments = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        else:
            return None
        text = json.dumps(arguments, ensure_ascii=False)
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return None
    return ToolCall("call_" + secrets.token_hex(12), name, text)


class ReplySplitter:
    """Sorts an answer's text into content (passed on as it comes) and a tool call (held to the
    end). With tools offered, the first line is the metadata (ChatGLM3 and GLM-4): empty for a plain answer,
    the tool's name for a call. Without tools, only the empty metadata line is dropped."""

    def __init__(self, tools_offered: bool, raw: bool = False,
                 parse: Callable[[str, str], ToolCall | None] = parse_call) -> None:
        self.tools_offered = tools_offered
        self.parse = parse  # the family's own call format
        self.dummy_prefix = False
        self.state = "content" if raw else "start"  # -> "content" or "tool"
        self.buffer = ""

    def drop_dummy_prefix(self) -> ReplySplitter:
        """For a sentencepiece model's token bytes as written (a constrained answer), whose turns start
        " \\n " (the tokenizer's dummy prefix, which its own decoder drops): the spaces go too."""
        self.dummy_prefix = True
        if self.state == "content":
            self.state = "space"
        return self

    def feed(self, text: str) -> str:
        if self.state == "content":
            return text
        self.buffer += text
        if self.state == "tool" or not self.buffer:
            return ""
        if self.state == "space":  # raw text: only the dummy prefix's space to drop
            self.state = "content"
            out, self.buffer = self.buffer.removeprefix(" "), ""
            return out
        if not self.tools_offered and not self.dummy_prefix:
            self.state = "content"
            out, self.buffer = self.buffer.removeprefix("\n"), ""
            return out
        if "\n" not in self.buffer:
            return ""
        metadata, rest = self.buffer.split("\n", 1)
        if metadata.strip() and self.tools_offered:
            self.state = "tool"
            return ""
        if self.dummy_prefix:
            if not rest:
                return ""  # the space after the newline may follow
            rest = rest.removeprefix(" ")
        self.state, self.buffer = "content", ""
        return rest

    def finish(self) -> tuple[str, ToolCall | None]:
        """What is left to show, and the call if the answer was a well-formed one."""
        held, self.buffer = self.buffer, ""
        if self.state == "tool":
            name, body = held.split("\n", 1)
            call = self.parse(name, body)
            if call is not None:
                return "", call
        return held, None  # a call written badly comes back as plain text
