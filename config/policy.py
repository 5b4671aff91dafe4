"""What the settings decide about each request, derived from them once at start (the settings
layer's second half; config/settings.py reads them): the token ceilings by model with their aliases, the
fallback chains, which models read images,
and so the request limits the parsers check.

Derived from the settings and, for the local model, from what the configuration check found in
its file (its context, whether it reads images): never from the registry or a backend, so a test
can derive a policy without starting one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from compat.requests import Limits
from config.settings import Settings

if TYPE_CHECKING:
    from backends.chatglm.ggml_file import ModelFile


@dataclass(frozen=True)
class LocalModel:
    """The local model as the configuration check found it."""

    id: str
    context: int  # tokens of prompt and answer together: CHATGLM_MAX_LENGTH, else the model's own
    reads_images: bool = False
    file: ModelFile | None = field(default=None, compare=False)  # None: the demo model, not written yet


@dataclass(frozen=True)
class Policy:
    fallbacks: Mapping[str, tuple[str, ...]]  # model -> the models to try, in order, when it fails before answering
    ceilings: Mapping[str, int]  # MAX_TOKENS_CEILING by model or alias (an alias has its model's unless its own)
    max_tokens: int | None  # MAX_TOKENS_CEILING for every other model; None: the context decides
    image_models: frozenset[str]  # the local models that read images, and their aliases
    max_messages: int
    max_input_chars: int
    max_image_bytes: int

    @classmethod
    def derive(cls, settings: Settings, local: Sequence[LocalModel] = ()) -> Policy:
        return cls(fallback_chains(settings.model_fallbacks),
                   ceilings_by_name(settings.max_tokens_by_model, settings.model_aliases),
                   settings.max_tokens_ceiling, image_models(settings, local),
                   settings.max_messages, settings.max_input_chars, settings.max_image_bytes)

    @cached_property
    def limits(self) -> Limits:
        """What one request may ask for, as the parsers check it."""
        return Limits(self.max_messages, self.max_input_chars, self.max_tokens, self.ceilings, self.image_models,
                      self.max_image_bytes)

    def ceiling(self, model: str) -> int | None:
        """The most max_tokens a request for ``model`` (an id or an alias) may ask for."""
        return self.ceilings.get(model, self.max_tokens)


def fallback_chains(pairs: tuple[tuple[str, str], ...]) -> dict[str, tuple[str, ...]]:
    """MODEL_FALLBACKS' pairs, in order, as model -> its chain (a model named twice has two)."""
    chains: dict[str, tuple[str, ...]] = {}
    for model, fallback in pairs:
        chains[model] = (*chains.get(model, ()), fallback)
    return chains


def ceilings_by_name(by_model: tuple[tuple[str, int], ...], aliases: tuple[tuple[str, str], ...]) -> dict[str, int]:
    """MAX_TOKENS_CEILING's per-model ceilings, each alias given its model's unless it has its own."""
    ceilings = dict(by_model)
    for alias, target in aliases:
        if alias not in ceilings and target in ceilings:
            ceilings[alias] = ceilings[target]
    return ceilings


def image_models(settings: Settings, local: Sequence[LocalModel]) -> frozenset[str]:
    """Only local models may read images (Workers AI's list is not asked: it may be discovered later)."""
    readers = {model.id for model in local if model.reads_images}
    return frozenset([*readers, *(alias for alias, target in settings.model_aliases if target in readers)])
