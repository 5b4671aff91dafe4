"""A fake Cloudflare API on 127.0.0.1 speaking Workers AI's wire format (shared notes on Cloudflare,
sections 1-5): the v4 envelope, SSE frames with the random "p" padding, the usage frame, `[DONE]`,
chunked transfer, and the error bodies and codes.

The model name picks the behaviour: `@cf/fake/<mode>` (see MODES). Every request is recorded.
`@cf/fake/scripted` is a model the prompt scripts: a line `CALL <tool> <JSON arguments>` in the last
user message makes it call that tool (a real client's own tools, e.g. Claude Code's), and a tool result
makes it say what the tool said.
"""

from __future__ import annotations

import json
import random
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests import fake_media
from tests.fake_http import FakeServer, WireHandler

ACCOUNT = "0123456789abcdef0123456789abcdef"
TOKEN = "cf-test-token-SECRET-8d7f6e5a"

ERRORS: dict[str, tuple[int, dict[str, Any], dict[str, str]]] = {
    "429": (429, {"errors": [{"message": "Capacity temporarily exceeded, please try again.", "code": 3040}],
                  "success": False, "result": {}, "messages": []}, {"Retry-After": "1"}),
    "4006": (429, {"errors": [{"message": "AiError: AiError: you have used up your daily free allocation of 10,000 "
                                          "neurons, please upgrade to Cloudflare's Workers Paid plan if you would "
                                          "like to continue usage. (51afe8c9-aaaa)", "code": 4006}],
                   "success": False, "result": {}, "messages": []}, {}),
    "5006": (400, {"errors": [{"message": "AiError: Bad input: Error: oneOf at '/' not met, 0 matches: required "
                                          "properties at '/' are 'prompt'", "code": 5006}],
                   "success": False, "result": {}, "messages": []}, {}),
    "5007": (400, {"errors": [{"code": 5007, "message": "No such model @cf/fake/5007 or task"}], "success": False}, {}),
    "3006": (413, {"errors": [{"code": 3006, "message": "Request is too large"}], "success": False}, {}),
}
MODES = ["chat", "slow", "long", "openai", "json", "jsonobj", "tools", "toolsflat", "scripted", "bge", "split", "drop",
         "stall",
         "malformed", "nodone", "flaky", "500", "cut429", "cut400", "stall500", "deep", "jsonfail",
         "unauthorized", *ERRORS]
TEXT_MODELS = [f"@cf/fake/{m}" for m in ("chat", "slow", "openai")]
# Past what aigate reads, kept out of MODES (which other tests send every one of): 301 and 307 redirect to
# ``redirect_to``; hugeline streams two words, then a line of 100 MB in one HTTP chunk; hugebody answers 100 MB.
BOUND_MODES = ["301", "307", "hugeline", "hugebody"]


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeCloudflare(FakeServer):
    """Start with .start(); .base is the CLOUDFLARE_API_BASE to configure."""

    frame_delay: float = 0.01
    requests: list[Recorded] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)  # models whose stream the client closed early
    finished: list[str] = field(default_factory=list)  # models whose stream ran to [DONE]
    changed: threading.Condition = field(default_factory=threading.Condition)
    counters: dict[str, int] = field(default_factory=dict)
    catalogue_down: bool = False  # the models search API answers 500 while set
    redirect_to: str = "http://127.0.0.1:9"  # where the 3xx modes send a client (scheme, host and port)

    def start(self) -> FakeCloudflare:
        self.serve(_Handler)
        return self

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/client/v4"

    def wait_for(self, predicate, timeout: float = 10) -> bool:
        with self.changed:
            return self.changed.wait_for(predicate, timeout)

    def note(self, bucket: list[str], model: str) -> None:
        with self.changed:
            bucket.append(model)
            self.changed.notify_all()

    def runs(self, model: str) -> list[Recorded]:
        return [r for r in self.requests if r.path.endswith("/ai/run/" + model)]


def cloudflare_env(fake: FakeCloudflare, **extra: str) -> dict[str, str]:
    """The settings that point a server's Cloudflare backend at the fake."""
    return {"CLOUDFLARE_ACCOUNT_ID": ACCOUNT, "CLOUDFLARE_API_TOKEN": TOKEN, "CLOUDFLARE_API_BASE": fake.base,
            **extra}


def reply_words(body: dict[str, Any]) -> list[str]:
    """What the fake model says: its last user message echoed, one word per token."""
    last = body.get("prompt") or next(
        (m["content"] for m in reversed(body.get("messages", [])) if m.get("role") == "user"), "")
    words = ("You said: " + last).split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)][: body.get("max_tokens", 256)]


def fake_embedding(text: str) -> list[float]:
    """Eight numbers that depend on the text, exactly representable as float32."""
    return [((sum(map(ord, text)) * (i + 1)) % 97) / 8 for i in range(8)]


def usage_for(body: dict[str, Any], completion: int) -> dict[str, int]:
    prompt = sum(len(str(m.get("content", "")).split()) + 4 for m in body.get("messages", [])) + len(
        str(body.get("prompt", "")).split())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _Handler(WireHandler):
    state: FakeCloudflare

    def envelope(self, result: Any) -> dict[str, Any]:
        return {"result": result, "success": True, "errors": [], "messages": []}

    # -- routes --------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        self.record(None)
        if not self.authorized():
            return
        if url.path.endswith("/ai/models/search") and self.state.catalogue_down:
            self.send_json(500, {"success": False, "errors": [{"code": 7001, "message": "Internal error"}]})
        elif url.path.endswith("/ai/models/search"):
            query = parse_qs(url.query)
            page = int(query.get("page", ["1"])[0])
            items = [{"id": f"uuid-{i}", "source": 1, "name": m, "description": "fake",
                      "task": {"id": "t", "name": "Text Generation", "description": ""},
                      "created_at": "2025-01-28 16:04:39.346", "tags": [], "properties": []}
                     for i, m in enumerate(TEXT_MODELS)]
            self.send_json(200, {**self.envelope(items if page == 1 else []),
                                 "result_info": {"page": page, "per_page": 50, "count": len(items)}})
        else:
            self.send_json(400, {"success": False, "errors": [{"code": 7000, "message": "No route for that URI"}]})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)  # whatever the Content-Type says, like the real API
        except ValueError:
            body = None
        self.record(body)
        if not self.authorized():
            return
        if self.path.split("/ai/run/")[-1] in fake_media.MODELS:  # reranking, speech, images: tests/fake_media.py
            fake_media.answer_workers_ai(self, self.path.split("/ai/run/")[-1], raw)
            return
        if self.path.endswith("/ai/v1/chat/completions") and isinstance(body, dict):
            self.answer_openai(body)
            return
        marker = "/ai/run/"
        if marker not in self.path or not isinstance(body, dict):
            self.send_json(400, {"success": False, "errors": [{"code": 7000, "message": "No route for that URI"}]})
            return
        model = self.path.split(marker, 1)[1]
        mode = model.removeprefix("@cf/fake/")
        state = self.state
        try:
            self.answer(model, mode, body, state)
        except (BrokenPipeError, ConnectionResetError):
            state.note(state.aborted, model)

    def answer(self, model: str, mode: str, body: dict[str, Any], state: FakeCloudflare) -> None:
        if mode in ("301", "307"):
            self.redirect(int(mode), state.redirect_to + self.path)
            return
        if mode == "hugebody":
            self.huge_body(200, b'{"success": true, "result": {"response": "', b'"}}')
            return
        if mode == "hugeline" and body.get("stream"):
            self.start_sse()
            for word in reply_words(body)[:2]:
                self.frame({"response": word})
            self.huge_chunk(b'data: {"response": "')
            return
        if mode == "flaky":
            state.counters[model] = state.counters.get(model, 0) + 1
            if state.counters[model] % 2:
                self.send_json(500, {"success": False, "errors": [{"code": 3000, "message": "Internal error"}]})
                return
        if mode in ERRORS:
            status, error, headers = ERRORS[mode]
            self.send_json(status, error, headers)
            return
        if mode in ("cut429", "cut400", "stall500"):  # an error whose body stops after 37 of its bytes
            self.broken_error(mode)
            return
        if mode == "deep":  # an answer nested 100,000 levels deep, whole or as a stream event
            deep = b"[" * 100_000 + b"]" * 100_000
            if body.get("stream"):
                self.start_sse()
                self.frame(deep)
                self.frame(b"[DONE]")
                self.end_chunks()
            else:
                self.send_raw(200, b'{"result": {"response": ' + deep + b'}, "success": true}')
            return
        if mode == "500":
            data = b"internal server error"
            self.send_response(500)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        if mode not in MODES:
            self.send_json(400, {"errors": [{"code": 5007, "message": f"No such model {model} or task"}],
                                 "success": False})
            return
        if mode == "bge":  # an embedding model: {"text": [...]} -> {"shape": [n, 8], "data": [...]}
            texts = body.get("text")
            texts = [texts] if isinstance(texts, str) else texts
            if not isinstance(texts, list) or not 1 <= len(texts) <= 100:
                self.send_json(400, ERRORS["5006"][1])
                return
            data = [fake_embedding(t) for t in texts]
            self.send_json(200, self.envelope({"shape": [len(data), 8], "data": data}))
            return
        if mode == "scripted" and self.answer_scripted(body):
            return
        calls_tool = mode in ("tools", "toolsflat") and body.get("tools")
        if body.get("response_format") is not None and not (calls_tool and body["messages"][-1].get("role") != "tool"):
            self.answer_json_mode(mode, body)  # a tool-calling model calls its tool first, then answers in JSON
            return
        words = reply_words(body)
        if calls_tool:
            self.answer_tools(mode, body)
            return
        if mode == "jsonobj":  # JSON mode: `response` is an object, and there is no streaming
            self.send_json(200, self.envelope({"response": {"said": "".join(words)}, "usage": usage_for(body, 7)}))
            return
        if not body.get("stream") and mode in ("drop", "stall", "malformed", "nodone"):
            self.fail_whole(mode)
            return
        if not body.get("stream") or mode == "json":
            self.send_json(200, self.envelope({"response": "".join(words), "tool_calls": [],
                                               "usage": usage_for(body, len(words))}))
            return
        delay = {"slow": 0.05, "long": 0.1}.get(mode, state.frame_delay)
        if mode == "slow":
            words = (words * 20)[:20]
        elif mode == "long":  # as many frames as max_tokens, 100 ms apart (the benchmarks' stream)
            words = (words * body["max_tokens"])[:body["max_tokens"]]
        self.start_sse()
        for i, word in enumerate(words):
            if mode == "drop" and i == 3:
                self.connection.shutdown(socket.SHUT_RDWR)  # no end of chunks: the connection just dies
                return
            if mode == "stall" and i == 2:
                time.sleep(30)
                return
            if mode == "malformed" and i == 2:
                self.frame(b'{"response": "bro')
                continue
            time.sleep(delay)
            if mode == "openai":
                self.frame({"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": model,
                            "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]})
            elif mode == "split":  # one frame in three network chunks, split inside the JSON
                data = b"data: " + json.dumps({"response": word}).encode() + b"\r\n\r\n"
                for part in (data[:4], data[4:11], data[11:]):
                    self.chunk(part)
            else:
                self.frame({"response": word, "p": "x" * random.randint(1, 40)})
        if mode == "openai":
            self.frame({"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": model,
                        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                        "usage": usage_for(body, len(words))})
        else:
            self.frame({"response": ""})
            self.frame({"response": "", "usage": usage_for(body, len(words))})
        if mode != "nodone":
            self.frame(b"[DONE]")
        self.end_chunks()
        state.note(state.finished, model)

    def send_raw(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def broken_error(self, mode: str) -> None:
        status = {"cut429": 429, "cut400": 400, "stall500": 500}[mode]
        data = json.dumps({"errors": [{"code": 3040, "message": "x" * 900}], "success": False}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:37])
        self.wfile.flush()
        if mode == "stall500":
            time.sleep(30)
        else:
            self.connection.shutdown(socket.SHUT_RDWR)

    def fail_whole(self, mode: str) -> None:
        """The fault modes for an answer asked for whole: cut off, stalled, or not JSON."""
        data = json.dumps(self.envelope({"response": "You said: hello", "usage": {}})).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if mode == "drop":
            self.wfile.write(data[:20])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        elif mode == "stall":
            self.wfile.write(data[:20])
            self.wfile.flush()
            time.sleep(30)
        elif mode == "malformed":
            self.wfile.write(b"{oops" + data[5:])
        else:  # nodone: a JSON body cut short, the connection closed cleanly
            self.wfile.write(data[:-10])
            self.close_connection = True

    def answer_openai(self, body: dict[str, Any]) -> None:
        """Workers AI's OpenAI-compatible endpoint (/ai/v1/chat/completions, the model in the body),
        which other gateways use; the same words as /ai/run, in OpenAI's shapes."""
        words = reply_words(body)
        usage = usage_for(body, len(words))
        base = {"id": "chatcmpl-fake", "created": 1, "model": body.get("model", "")}
        if not body.get("stream"):
            self.send_json(200, {**base, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "".join(words)}, "finish_reason": "stop"}]})
            return
        self.start_sse()
        for word in words:
            time.sleep(self.state.frame_delay)
            self.frame({**base, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]})
        self.frame({**base, "object": "chat.completion.chunk", "usage": usage,
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        self.frame(b"[DONE]")
        self.end_chunks()

    def answer_json_mode(self, mode: str, body: dict[str, Any]) -> None:
        """Workers AI's JSON mode: `response_format: {type: json_object}` or `{type: json_schema,
        json_schema: <bare schema>}`; the answer is whole, `response` an object; no streaming."""
        fmt = body["response_format"]
        if body.get("stream"):
            self.send_json(400, {"errors": [{"code": 5006, "message": "AiError: JSON Mode currently doesn't "
                                                                      "support streaming"}], "success": False})
        elif mode == "jsonfail":
            self.send_json(400, {"errors": [{"code": 5006, "message": "AiError: JSON Mode couldn't be met"}],
                                 "success": False, "result": {}, "messages": []})
        elif fmt.get("type") == "json_schema" and isinstance(fmt.get("json_schema"), dict):
            schema = fmt["json_schema"]
            if "schema" in schema and "name" in schema:  # OpenAI's wrapper: the native models want the bare schema
                self.send_json(400, ERRORS["5006"][1])
                return
            self.send_json(200, self.envelope({"response": instance(schema, schema), "usage": usage_for(body, 12)}))
        elif fmt.get("type") == "json_object":
            self.send_json(200, self.envelope({"response": {"said": "".join(reply_words(body))},
                                               "usage": usage_for(body, 7)}))
        else:
            self.send_json(400, ERRORS["5006"][1])

    def answer_tools(self, mode: str, body: dict[str, Any]) -> None:
        """A function-calling model: it calls the first tool with {"city": "Paris"}, or, once it
        has a tool result, says what the tool said."""
        last = body["messages"][-1]
        name = body["tools"][0]["function"]["name"]
        usage = usage_for(body, 9)
        if last.get("role") == "tool":
            self.send_json(200, self.envelope({"response": "The tool said: " + last["content"], "usage": usage}))
        elif mode == "toolsflat":  # the documented native shape: whole JSON answer, arguments as an object
            self.send_json(200, self.envelope({"response": None, "usage": usage,
                                               "tool_calls": [{"name": name, "arguments": {"city": "Paris"}}]}))
        else:  # OpenAI-style pieces over several stream events
            self.start_sse()
            self.frame({"tool_calls": [{"id": "call_up1", "type": "function", "index": 0,
                                        "function": {"name": name, "arguments": '{"city": '}}], "p": "ab"})
            self.frame({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]})
            self.frame({"tool_calls": [], "p": "abdefgh"})
            self.frame({"finish_reason": "tool_calls"})
            self.frame({"response": "", "usage": usage})
            self.frame(b"[DONE]")
            self.end_chunks()

    def answer_scripted(self, body: dict[str, Any]) -> bool:
        """The scripted model's tool call or its reading of a tool result (streamed as OpenAI's pieces
        when asked to stream); False when the prompt scripts neither (it then answers as `chat`)."""
        messages = body.get("messages") or []
        last = messages[-1] if messages else {}
        if last.get("role") == "tool":
            self.send_json(200, self.envelope({"response": "The tool said: " + str(last.get("content")),
                                               "usage": usage_for(body, 9)}))
            return True
        asked = next((m for m in reversed(messages) if m.get("role") == "user"), {})
        script = re.search(r"^CALL (\S+) (\{.*\})$", str(asked.get("content", "")), re.M)
        if script is None:
            return False
        name, arguments = script.groups()
        if not body.get("stream"):
            self.send_json(200, self.envelope({"response": None, "usage": usage_for(body, 9), "tool_calls": [
                {"name": name, "arguments": json.loads(arguments)}]}))
            return True
        self.start_sse()
        self.frame({"tool_calls": [{"id": "call_scripted", "type": "function", "index": 0,
                                    "function": {"name": name, "arguments": arguments[:5]}}]})
        self.frame({"tool_calls": [{"index": 0, "function": {"arguments": arguments[5:]}}]})
        self.frame({"finish_reason": "tool_calls"})
        self.frame({"response": "", "usage": usage_for(body, 9)})
        self.frame(b"[DONE]")
        self.end_chunks()
        return True

    def record(self, body: Any) -> None:
        self.state.requests.append(Recorded(self.command, self.path, dict(self.headers), body))

    def authorized(self) -> bool:
        if f"/accounts/{ACCOUNT}/" not in self.path:
            self.send_json(404, {"result": None, "success": False, "errors": [{"code": 7003, "message": (
                f"Could not route to {urlsplit(self.path).path}, perhaps your object identifier is invalid?")}],
                "messages": []})
            return False
        if self.headers.get("Authorization") != f"Bearer {TOKEN}" or "unauthorized" in self.path:
            self.send_json(401, {"success": False, "errors": [{"code": 10000, "message": "Authentication error"}]})
            return False
        return True


def instance(schema: Any, root: dict[str, Any]) -> Any:
    """A small value matching a JSON Schema (what a JSON-mode model would write): $ref, anyOf,
    enum, const, objects (every property), arrays (one item), strings, numbers, booleans."""
    if not isinstance(schema, dict):
        return None
    if "$ref" in schema:  # "#/$defs/Name", as pydantic writes nested models
        target: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target.get(part, {})
        return instance(target, root)
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return instance(schema[key][0], root)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type", "object")
    kind = kind[0] if isinstance(kind, list) else kind
    if kind == "object":
        return {name: instance(sub, root) for name, sub in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [instance(schema.get("items", {"type": "string"}), root)]
    return {"string": "Paris", "integer": 3, "number": 2.5, "boolean": True, "null": None}.get(kind, "Paris")
