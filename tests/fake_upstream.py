"""A fake OpenAI-compatible upstream on 127.0.0.1 (the wire format of /v1/chat/completions,
/v1/completions, /v1/embeddings and /v1/models), with the faults real servers have.

The model name picks the behaviour (`fake-<mode>`, see MODES) unless ``mode`` is set on the fake,
which then holds for every model (a pool member told to fail). Every request is recorded.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tests import fake_media
from tests.fake_cloudflare import fake_embedding, reply_words
from tests.fake_http import FakeServer, WireHandler

KEY = "sk-upstream-SECRET-5f4e3d"
# ok: a model server by the book. quirks: what real ones get wrong (no id/created, `default-model`,
# usage in every chunk, nulls, reasoning_content, no [DONE]). json: a JSON body to a stream
# request. tools: a tool call in pieces. bare: a stream by the book but without usage, asked for or not (as
# chatglm.cpp's server). The rest are faults: 301 and 307 redirect to ``redirect_to``; hugeline sends two words,
# then a line of 100 MB; hugebody a JSON answer of 100 MB, hugeerror a 500 whose body is as large.
MODES = ["ok", "quirks", "json", "tools", "bare", "stall", "drop", "429", "500", "malformed", "truncated", "slow",
         "301", "307", "hugeline", "hugebody", "hugeerror"]
REDIRECTS = {"301", "307"}


@dataclass
class FakeUpstream(FakeServer):
    """Start with .start(); .base is the base_url to configure."""

    models: list[str] = field(default_factory=lambda: [f"fake-{m}" for m in MODES])
    mode: str | None = None  # set: every request behaves so, whatever its model
    models_down: bool = False  # GET /models answers 503 while set
    models_moved: bool = False  # GET /models answers 307 to redirect_to while set
    redirect_to: str = "http://127.0.0.1:9"  # where the 3xx modes send a client (scheme, host and port)
    requests: list[dict[str, Any]] = field(default_factory=list)  # {"path", "headers", "body"}
    changed: threading.Condition = field(default_factory=threading.Condition)

    def start(self) -> FakeUpstream:
        self.serve(_Handler)
        return self

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def posts(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["body"] is not None]


def usage(body: dict[str, Any], completion: int) -> dict[str, Any]:
    prompt = chat_prompt_tokens(body) if body.get("messages") else 7 + len(json.dumps(body.get("prompt") or
                                                                                      body.get("input"))) // 10
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 3}}


def chat_prompt_tokens(body: dict[str, Any]) -> int:
    """What a server counts for a chat prompt: its template's tokens as OpenAI's counting guidance has them (3 a
    message, 1 for the role, 1 more for a name, 3 priming the reply; the tools' definitions as JSON), its
    tokenizer's at 4 characters a token."""
    def tokens(text: str) -> int:
        return math.ceil(len(text) / 4)

    count = 3
    for m in body["messages"]:
        calls = "".join(c["function"]["name"] + c["function"]["arguments"] for c in m.get("tool_calls") or [])
        count += 3 + 1 + tokens((m.get("content") or "") + calls) + (1 + tokens(m["name"]) if m.get("name") else 0)
    return count + sum(tokens(json.dumps(t["function"], ensure_ascii=False, separators=(",", ":")))
                       for t in body.get("tools") or [])


class _Handler(WireHandler):
    state: FakeUpstream

    def record(self, body: Any) -> None:
        with self.state.changed:
            self.state.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
            self.state.changed.notify_all()

    def do_GET(self) -> None:
        self.record(None)
        if self.path.rstrip("/").endswith("/models"):
            if self.state.models_moved:
                self.redirect(307, self.state.redirect_to + self.path)
            elif self.state.models_down:
                self.send_json(503, {"error": {"message": "loading", "type": "server_error"}})
            else:
                self.send_json(200, {"object": "list", "data": [{"id": m, "object": "model", "created": 1700000000,
                                                                 "owned_by": "fake"} for m in self.state.models]})
        else:
            self.send_json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        if self.state.mode in REDIRECTS:
            self.record(None)
            return self.redirect(int(self.state.mode), self.state.redirect_to + self.path)
        if fake_media.upstream_serves(self.path):  # reranking, speech, images: tests/fake_media.py
            return fake_media.answer_upstream(self, self.state.mode)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        self.record(body)
        model = body.get("model", "")
        mode = self.state.mode or model.removeprefix("fake-")
        if mode in REDIRECTS:
            return self.redirect(int(mode), self.state.redirect_to + self.path)
        if mode == "hugeerror":
            return self.huge_body(500, b'{"error": {"message": "', b'"}}')
        if mode == "hugebody":
            return self.huge_body(200, b'{"choices": [{"index": 0, "finish_reason": "stop", "message": {"content": "',
                                  b'"}}]}')
        if mode == "stall":  # holds the connection, says nothing
            time.sleep(30)
            return
        if mode == "429":
            return self.send_json(429, {"error": {"message": "Rate limit reached", "type": "rate_limit"}},
                                  {"Retry-After": "7"})
        if mode == "500":  # an error that quotes the upstream's own address and the key it was sent
            return self.send_json(500, {"error": {"message": f"engine crashed at {self.state.base} with key {KEY}"}})
        if self.path.endswith("/embeddings"):
            inputs = body["input"]
            return self.send_json(200, {"object": "list", "model": model, "usage": usage(body, 0), "data": [
                {"object": "embedding", "index": i, "embedding": fake_embedding(t)} for i, t in enumerate(inputs)]})
        chat = self.path.endswith("/chat/completions")
        words = reply_words(body)
        if mode == "tools":
            return self.tools(body)
        if not body.get("stream") or mode == "json":
            return self.whole(body, words, chat)
        self.start_sse()
        if mode == "malformed":
            self.frame(b"{not json")
        for i, word in enumerate(words):
            if mode == "drop" and i == 2:
                self.connection.shutdown(socket.SHUT_RDWR)  # the connection breaks mid-answer
                return
            if mode == "slow":
                time.sleep(0.2)
            if mode == "hugeline" and i == 2:
                return self.huge_chunk(b'data: {"choices": [{"index": 0, "delta": {"content": "')
            self.frame(self.piece(body, word, chat, mode, i))
        if mode == "truncated":  # ends cleanly, but without a finish_reason or [DONE]
            return self.chunk(b"")
        last = self.piece(body, "", chat, mode, len(words) - 1)  # its running usage: every word
        last["choices"][0]["finish_reason"] = "length" if len(words) >= body.get("max_tokens", 1 << 30) else "stop"
        self.frame(last)
        if (body.get("stream_options") or {}).get("include_usage") and mode not in ("quirks", "bare"):
            self.frame({"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": model,
                        "choices": [], "usage": usage(body, len(words))})
        if mode != "quirks":
            self.frame(b"[DONE]")
        self.chunk(b"")

    def piece(self, body: dict[str, Any], word: str, chat: bool, mode: str, i: int) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "delta": {"content": word}} if chat else {"index": 0, "text": word}
        if mode == "quirks":  # chatglm.cpp's and others' ways: no id/created, nulls, running usage
            if chat:
                choice["delta"] = {"role": None, "content": word, "reasoning_content": "thinking...",
                                   "tool_calls": None}
            return {"object": "chat.completion.chunk", "model": "default-model", "choices": [choice],
                    "usage": usage(body, i + 1)}
        choice["finish_reason"] = None
        return {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                "choices": [choice]}

    def whole(self, body: dict[str, Any], words: list[str], chat: bool) -> None:
        text = "".join(words)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"} if chat
                  else {"index": 0, "text": text, "finish_reason": "stop"})
        self.send_json(200, {"id": "x", "object": "chat.completion" if chat else "text_completion", "created": 1,
                             "model": "default-model", "choices": [choice], "usage": usage(body, len(words))})

    def tools(self, body: dict[str, Any]) -> None:
        """A call to the first tool, its arguments in three pieces."""
        name = body["tools"][0]["function"]["name"]
        self.start_sse()
        pieces = [{"index": 0, "id": "call_up1", "type": "function", "function": {"name": name, "arguments": ""}},
                  {"index": 0, "function": {"arguments": '{"city": '}},
                  {"index": 0, "function": {"arguments": '"Paris"}'}}]
        for piece in pieces:
            self.frame({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                        "choices": [{"index": 0, "delta": {"tool_calls": [piece]}, "finish_reason": None}]})
        self.frame({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
        self.frame(b"[DONE]")
        self.chunk(b"")
