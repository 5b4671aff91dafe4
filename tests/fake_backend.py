"""An in-process backend for fast route tests: no model, no socket, no gunicorn. It speaks the
Backend protocol exactly (events, errors, closing), so a route test through Flask's test client
exercises the real parsing, generation start, limits, errors and response building in milliseconds.

The model picks the behaviour: `fake-echo` answers "You said: <last user message>" one word per
event; `fake-busy` raises QueueFull before its first event; `fake-broken` fails after its first;
`fake-controls` declares every sampling control and answers as `fake-echo` does, n choices one after
another (choice k > 0 begins "(k)"), each word with its log probability (-0.25 * its place in the
answer, most likely first among the alternatives "alt1".."altK" when asked).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator
from pathlib import Path

from flask import Flask

from backends.base import (
    Caller,
    ChatRequest,
    Control,
    Embeddings,
    Event,
    Finish,
    ModelInfo,
    QueueFull,
    TextDelta,
    TokenLogprob,
    TopLogprob,
    UpstreamError,
    Usage,
    estimate_tokens,
)
from backends.registry import Registry
from web.context import state

MODELS = ("fake-echo", "fake-busy", "fake-broken", "fake-controls")
CONTROLS: frozenset[Control] = frozenset({"logprobs", "seed", "logit_bias", "n", "penalties", "tool_choice"})


class FakeBackend:
    name = "fake"

    def __init__(self) -> None:
        self.requests: list[ChatRequest] = []
        self.callers: list[Caller | None] = []  # what each chat and embed was told of its request
        self.closed = 0  # generations closed before their end (a client that left, an error)

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(m, "test", controls=CONTROLS if m == "fake-controls" else frozenset()) for m in MODELS]

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
        finished = False
        try:
            for choice in range(request.n):
                words = ((f"({choice}) " if choice else "") + "You said: " + last).split(" ")
                words = [w if i == 0 else " " + w for i, w in enumerate(words)][: request.max_tokens or None]
                for i, word in enumerate(words):
                    if request.model == "fake-broken" and i == 1:
                        raise UpstreamError("the fake upstream broke")
                    yield TextDelta(word, _logprobs(word, i, request.top_logprobs) if request.logprobs else (), choice)
                reason = "length" if request.max_tokens is not None and len(words) >= request.max_tokens else "stop"
                prompt = request.estimated_prompt_tokens if choice == 0 else 0  # counted once, as the contract has it
                yield Finish(reason, Usage(prompt, len(words)), choice=choice)
            finished = True
        finally:
            if not finished:
                self.closed += 1


def _logprobs(word: str, place: int, top: int) -> tuple[TokenLogprob, ...]:
    logprob = -0.25 * place
    alternatives = (TopLogprob(word, logprob, word.encode()),
                    *(TopLogprob(f"alt{k}", logprob - k, f"alt{k}".encode()) for k in range(1, top)))
    return (TokenLogprob(word, logprob, word.encode(), alternatives[:top]),)


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
