"""Which tool declares the wire types (issue 13): the time to read a chat request (a typical one and one
of 1,000 messages) into its declaration, and to encode one stream chunk, for pydantic v2 and msgspec
against the hand-written parser of BEFORE and dict chunks; then the whole parse_chat (declaration,
checks, ChatRequest) of this checkout against BEFORE's, both in this one process. In-process, one
core, medians of rounds.

    .venv/bin/python bench/wire_parse.py        # writes bench/results/wire_parse.md
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import pydantic
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compat import sse  # noqa: E402
from compat.completion_objects import Completion, chunk  # noqa: E402
from compat.requests import parse_chat  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "wire_parse.md"
CHOICE = """## Choice

msgspec: it reads a chat request 8-20x faster than the hand-written parser before it (pydantic v2: 2-3.5x),
gives errors with the JSON path the 400s need (`$.messages[3].content[0].text`, mapped to OpenAI's `param` by
`compat/wire.py`'s one table), and writes JSON Schema 2020-12 components that OpenAPI 3.1 takes as they are.
The whole parse_chat (declaration, limits, ChatRequest) costs less than before: 0.8x for a typical request,
0.6x for 1,000 messages. pydantic v2 would have made encoding a chunk slower (1.35-1.44x); the chunk builders
are unchanged (dicts, compat/sse.py's encoder), so the per-token path costs what it did. msgspec could also
encode chunks 4-5x faster (last rows), a change left to the hot path's owner. The first run, on a quiet host
(load 0.93, commit 3a05dfb), gave the same ratios: msgspec 0.09x / 0.04x, pydantic 0.28x / 0.41x, chunk
encoding msgspec 0.15x / 0.20x, pydantic 1.35x.
"""
BEFORE = "fe2a595"  # the last commit with the hand-written parser


def before(name: str, path: str, replace: dict[str, str] | None = None) -> types.ModuleType:
    """BEFORE's version of a module, loaded beside this checkout's under another name."""
    source = subprocess.run(["git", "show", f"{BEFORE}:{path}"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    for old, new in (replace or {}).items():
        source = source.replace(old, new)
    module = types.ModuleType(name)
    sys.modules[name] = module
    exec(compile(source, path, "exec"), module.__dict__)  # noqa: S102 - our own file, from git
    return module


before("compat._before_structured", "compat/structured.py")
OLD = before("compat._before_requests", "compat/requests.py",
             {"from compat.structured import": "from compat._before_structured import"})

TYPICAL = {"model": "@cf/meta/llama-3.1-8b-instruct", "stream": True, "stream_options": {"include_usage": True},
           "max_tokens": 256, "temperature": 0.7,
           "messages": [{"role": "system", "content": "You are a helpful assistant."},
                        {"role": "user", "content": "What is the capital of France?"},
                        {"role": "assistant", "content": "Paris."},
                        {"role": "user", "content": [{"type": "text", "text": "And of Italy?"}]}],
           "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                                         "parameters": {"type": "object",
                                                                        "properties": {"city": {"type": "string"}}}}}]}
LONG = {"model": "m", "messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " * 8}
                                   for i in range(1000)]}


# -- pydantic v2 -------------------------------------------------------------------------------------------
class PStrict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class PText(PStrict):
    type: Literal["text"]
    text: str


class PFunction(PStrict):
    name: str
    arguments: Any = None


class PCall(PStrict):
    id: str | None = None
    function: PFunction


class PMessage(PStrict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[PText] | None = None
    tool_calls: list[PCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class PToolFunction(PStrict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=dict)


class PTool(PStrict):
    type: Literal["function"] = "function"
    function: PToolFunction


class PStreamOptions(PStrict):
    include_usage: bool | None = None


class PChat(PStrict):
    model: Annotated[str, Field(min_length=1)]
    n: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None
    messages: Annotated[list[PMessage], Field(min_length=1)]
    tools: list[PTool] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: bool | None = None
    stream_options: PStreamOptions | None = None


P_CHAT = TypeAdapter(PChat)


class PDelta(BaseModel):
    content: str


class PChoice(BaseModel):
    index: int
    delta: PDelta
    logprobs: None
    finish_reason: str | None


class PChunk(BaseModel):
    id: str
    object: str
    created: int
    model: str
    choices: list[PChoice]


# -- msgspec -----------------------------------------------------------------------------------------------
class MText(msgspec.Struct, forbid_unknown_fields=False):
    type: Literal["text"]
    text: str


class MFunction(msgspec.Struct):
    name: str
    arguments: Any = None


class MCall(msgspec.Struct):
    function: MFunction
    id: str | None = None


class MMessage(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[MText] | None = None
    tool_calls: list[MCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class MToolFunction(msgspec.Struct):
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str = ""
    parameters: dict[str, Any] = {}


class MTool(msgspec.Struct):
    function: MToolFunction
    type: Literal["function"] = "function"


class MStreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class MChat(msgspec.Struct):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    messages: Annotated[list[MMessage], msgspec.Meta(min_length=1)]
    n: Annotated[int, msgspec.Meta(ge=1)] | None = None
    user: str | None = None
    tools: list[MTool] | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    stop: str | Annotated[list[str], msgspec.Meta(max_length=4)] | None = None
    stream: bool | None = None
    stream_options: MStreamOptions | None = None


class MDelta(msgspec.Struct):
    content: str


class MChoice(msgspec.Struct):
    index: int
    delta: MDelta
    logprobs: None
    finish_reason: str | None


class MChunk(msgspec.Struct):
    id: str
    object: str
    created: int
    model: str
    choices: list[MChoice]


M_ENCODER = msgspec.json.Encoder()


def median_us(fn: Any, n: int) -> float:
    rounds = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(rounds)


def main() -> None:
    load = os.getloadavg()
    completion = Completion("m", id="chatcmpl-x", created=1)
    cases: dict[str, dict[str, Any]] = {}
    for name, body, n in (("typical chat request", TYPICAL, 3000), ("1,000-message chat request", LONG, 30)):
        cases[name] = {
            f"today ({BEFORE}'s compat.requests.parse_chat)": lambda body=body: OLD.parse_chat(body),
            "pydantic v2 (validate the dict)": lambda body=body: P_CHAT.validate_python(body),
            "msgspec (convert the dict)": lambda body=body: msgspec.convert(body, MChat, strict=True),
            "_n": n,
        }
    for name, body, n in (("whole parse_chat, typical", TYPICAL, 3000), ("whole parse_chat, 1,000 messages", LONG, 30)):
        cases[name] = {
            f"{BEFORE}'s hand-written parse_chat": lambda body=body: OLD.parse_chat(body),
            "parse_chat on the msgspec declarations (compat/wire.py)": lambda body=body: parse_chat(body),
            "_n": n,
        }
    cases["encode one content chunk"] = {
        "today (dict + json encoder, compat.sse.encode)": lambda: sse.encode(chunk(completion, {"content": "tok"})),
        "pydantic v2 (model_dump_json)": lambda: b"data: " + PChunk(
            id="chatcmpl-x", object="chat.completion.chunk", created=1, model="m",
            choices=[PChoice(index=0, delta=PDelta(content="tok"), logprobs=None, finish_reason=None)]
        ).model_dump_json().encode() + b"\n\n",
        "msgspec (Struct, msgspec.json)": lambda: b"data: " + M_ENCODER.encode(MChunk(
            "chatcmpl-x", "chat.completion.chunk", 1, "m", [MChoice(0, MDelta("tok"), None, None)])) + b"\n\n",
        "msgspec (the same dict, msgspec.json)": lambda: b"data: " + M_ENCODER.encode(
            chunk(completion, {"content": "tok"})) + b"\n\n",
        "_n": 20000,
    }
    rows = []
    for case, contenders in cases.items():
        n = contenders.pop("_n")
        base = None
        for name, fn in contenders.items():
            fn()  # warm
            us = median_us(fn, n)
            base = base or us
            rows.append(f"| {case} | {name} | {us:,.1f} | {us / base:.2f}x |")
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True,
                         text=True).stdout.strip()
    text = "\n".join([
        "# Wire declarations: what reading a request and writing a chunk cost (bench/wire_parse.py)",
        "",
        f"In-process, one core ({cpu}), median of 7 rounds per contender, microseconds per call; pydantic "
        f"{pydantic.VERSION}, msgspec {msgspec.__version__}. Load average before: {load[0]:.2f}, after: "
        f"{os.getloadavg()[0]:.2f} (2 cores, shared with other sessions' work).",
        f"The first rows: the chat request's shape (types, bounds, enums) declared in each candidate, against "
        f"{BEFORE}'s parser, which also checks limits and builds the ChatRequest (it does more than either "
        "candidate alone). The `whole parse_chat` rows: the same work on both sides, before and after the "
        "declarations. The chunk rows: building and encoding one content chunk; the builders keep making dicts "
        "(compat/answers.py declares their shapes for the document and the tests).",
        "",
        "| case | contender | us per call | vs today |",
        "|---|---|---:|---:|",
        *rows,
        "",
        CHOICE,
    ])
    RESULTS.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
