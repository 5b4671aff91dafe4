"""What a request may cost at most (web.generation.most_tokens), read off what its model declares
(ModelInfo.open_ended_tokens, shared_context), never off a backend's name."""

from __future__ import annotations

from dataclasses import replace
from typing import cast

from backends.base import Backend, ChatRequest, Message, ModelInfo
from backends.registry import Route
from web.generation import most_tokens

REQUEST = ChatRequest(model="m", messages=(Message("user", "x" * 400),))  # about 100 tokens of prompt


def cost(info: ModelInfo, max_tokens: int | None = None) -> int:
    return most_tokens(Route(cast(Backend, object()), info.id, info), replace(REQUEST, max_tokens=max_tokens))


def test_max_tokens_when_asked_whatever_the_model():
    prompt = REQUEST.estimated_prompt_tokens
    for info in (ModelInfo("m", "x"), ModelInfo("m", "x", open_ended_tokens=2048),
                 ModelInfo("m", "x", open_ended_tokens=512, shared_context=True)):
        assert cost(info, 50) == prompt + 50


def test_an_open_ended_answer_costs_what_its_model_lets_it_take():
    prompt = REQUEST.estimated_prompt_tokens
    assert cost(ModelInfo("m", "x")) == prompt  # no bound declared (an upstream's): the prompt alone
    assert cost(ModelInfo("m", "x", open_ended_tokens=2048)) == prompt + 2048  # Workers AI: its own room
    # A local context holds prompt and answer together: the whole context, or the prompt if longer.
    assert cost(ModelInfo("m", "x", open_ended_tokens=512, shared_context=True)) == 512
    assert cost(ModelInfo("m", "x", open_ended_tokens=50, shared_context=True)) == prompt
