"""What a backend whose models' own tokenizer aigate can run has besides chat (the local model: its
engine holds the tokenizer): a request's prompt as the model reads it, in token ids, and the text of
token ids. compat asks for this protocol and answers a model whose backend lacks it with a 400."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from backends.base import ChatRequest


@dataclass(frozen=True)
class PromptTokens:
    ids: list[int]  # the prompt, its chat template (or prefix) included
    positions: int  # the context positions it takes: its ids, and more for an image than its marker ids
    context: int  # the model's context: prompt and answer together


@runtime_checkable
class Tokenizer(Protocol):
    def tokenize(self, request: ChatRequest) -> PromptTokens:
        """The prompt ``request`` makes, however long (ContextLengthExceeded is generation's)."""
        ...

    def detokenize(self, model: str, tokens: list[int]) -> str:
        """The text of ``tokens`` (special tokens by their names); InvalidRequest for an id the model has not."""
        ...
