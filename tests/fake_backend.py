"""An in-process backend for fast route tests: no model, no socket, no gunicorn. It speaks the
Backend protocol exactly (events, errors, closing), so a route test through Flask's test client
exercises the real parsing, generation start, limits, errors and response building in milliseconds.

The model picks the behaviour: `fake-echo` answers "You said: <last user message>" one word per
event; `fake-busy` raises QueueFull before its first event; `fake-broken` fails after its first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator
from pathlib import Path

from flask import Flask

from backends.base import (
    Caller,
    ChatRequest,
    Embeddings,
    Event,
    Finish,
    ModelInfo,
    QueueFull,
    TextDelta,
    UpstreamError,
    Usage,
    estimate_tokens,
)
from backends.registry import Registry
from web.context import state

MODELS = ("fake-echo", "fake-busy", "fake-broken")


class FakeBackend:
    name = "fake"

    def __init__(self) -> None:
        self.requests: list[ChatRequest] = []
        self.callers: list[Caller | None] = []  # what each chat and embed was told of its request
        self.closed = 0  # generations closed before their end (a client that left, an error)

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(m, "test") for m in MODELS]

    def load(self) -> None:
        pass

    def readiness(self) -> str | None:
        return None

    def stats(self) -> dict[str, float]:
        return {}

    def embed(self, model: str, inputs: list[str], caller: Caller | None = None) -> Embeddings:
        self.callers.append(caller)
        return Embeddings([[float(len(text)), 1.0] for text in inputs], sum(estimate_tokens(len(t)) for t in inputs))

    def chat(self, request: ChatRequest, caller: Caller | None = None) -> Generator[Event, None, None]:
        self.requests.append(request)
        self.callers.append(caller)
        if request.model == "fake-busy":
            raise QueueFull("every generation slot is busy", retry_after=2)
        last = next((m.content for m in reversed(request.messages) if m.role == "user"), request.prompt or "")
        words = ("You said: " + last).split(" ")
        words = [w if i == 0 else " " + w for i, w in enumerate(words)][: request.max_tokens or None]
        finished = False
        try:
            for i, word in enumerate(words):
                if request.model == "fake-broken" and i == 1:
                    raise UpstreamError("the fake upstream broke")
                yield TextDelta(word)
            finished = True
            reason = "length" if request.max_tokens is not None and len(words) >= request.max_tokens else "stop"
            yield Finish(reason, Usage(request.estimated_prompt_tokens, len(words)))
        finally:
            if not finished:
                self.closed += 1


def fake_app(tmp_path: Path, **changes: object) -> tuple[Flask, FakeBackend]:
    """The real app (settings, blueprints, hooks, limits, errors) serving the fake backend."""
    from app import create_app
    from config.settings import load_settings

    # Workers AI settings naming the fake's models (so that no local model is set up and the checks of
    # keys, aliases and ceilings know them); its backend is then replaced before any request.
    settings = dataclasses.replace(load_settings({"CLOUDFLARE_ACCOUNT_ID": "fake", "CLOUDFLARE_API_TOKEN": "fake",
                                                  "CLOUDFLARE_MODELS": ",".join(MODELS)}, dotenv=None),
                                   state_dir=tmp_path / "state", **changes)
    app = create_app(settings)
    backend = FakeBackend()
    state(app).registry = Registry([backend], {})
    return app, backend
