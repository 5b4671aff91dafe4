"""How a slot's tokens reach the model. Both runners evaluate ``ids[start:]`` into the slot's cache (which
holds what comes before; after an image, ``extra`` positions more than ids) and then give the next token,
chosen by chatglm.cpp with a GenerationConfig, or the logits of the last one.

BatchedRunner (aigate's build from 0.4.2+aigate.3): the slot is one KV cache of a Pipeline that holds them all,
and its tokens go to the model's stepper, which evaluates every running sequence in one step. LegacyRunner (any
other build): a Pipeline of the slot's own, called directly, one call at a time in the process (COMPUTE).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import chatglm_cpp
import numpy as np

from backends.chatglm.engine.stepper import COMPUTE, Job, Stepper

BATCHED = hasattr(chatglm_cpp._C.BaseModelForCausalLM, "step")  # aigate's build from 0.4.2+aigate.3


class Runner(Protocol):
    batched: bool

    def next_token(self, ids: list[int], start: int, extra: int, config: Any, image: Any = None,
                   cancelled: Callable[[], bool] | None = None, last: bool = False) -> int:
        """Evaluate ``ids[start:]`` and return the token chatglm.cpp samples after them; ``last``: the answer
        takes no token after that one."""

    def logits(self, ids: list[int], start: int, extra: int, out: np.ndarray, image: Any = None,
               cancelled: Callable[[], bool] | None = None) -> None: ...

    def leave(self) -> None:
        """The slot's answer ended: nothing more will come from it until the next."""


def _n_past(start: int, extra: int) -> int:
    """chatglm.cpp's n_past: the cache positions before ``ids[start]`` (none while the prompt is read)."""
    return start + extra if start else 0


class LegacyRunner:
    batched = False

    def __init__(self, model: Any) -> None:
        self._model = model  # the slot's own Pipeline's model

    def next_token(self, ids: list[int], start: int, extra: int, config: Any, image: Any = None,
                   cancelled: Callable[[], bool] | None = None, last: bool = False) -> int:
        with COMPUTE:
            return int(self._model.generate_next_token(ids, image, config, _n_past(start, extra), len(ids)))

    def logits(self, ids: list[int], start: int, extra: int, out: np.ndarray, image: Any = None,
               cancelled: Callable[[], bool] | None = None) -> None:
        with COMPUTE:
            self._model.next_token_logits(ids, image, _n_past(start, extra), len(ids), out)

    def leave(self) -> None:
        pass


class BatchedRunner:
    batched = True

    def __init__(self, stepper: Stepper, model: Any, slot: int) -> None:
        self._stepper = stepper
        self._model = model  # the shared Pipeline's model: only the stepper's thread calls it
        self._slot = slot

    def next_token(self, ids: list[int], start: int, extra: int, config: Any, image: Any = None,
                   cancelled: Callable[[], bool] | None = None, last: bool = False) -> int:
        if image is not None:  # a step cannot take an image: the single-sequence path, on this slot
            return int(self._stepper.call(lambda: self._single(
                lambda: self._model.generate_next_token(ids, image, config, 0, len(ids)))))
        return self._stepper.evaluate(Job(self._slot, ids[start:], start + extra, start, sample=config,
                                          cancelled=cancelled, last=last))

    def logits(self, ids: list[int], start: int, extra: int, out: np.ndarray, image: Any = None,
               cancelled: Callable[[], bool] | None = None) -> None:
        if image is not None:
            self._stepper.call(lambda: self._single(lambda: self._model.next_token_logits(ids, image, 0, len(ids),
                                                                                          out)))
            return
        self._stepper.evaluate(Job(self._slot, ids[start:], start + extra, start, logits=out, cancelled=cancelled))

    def _single(self, fn: Callable[[], Any]) -> Any:
        self._model.use_slot(self._slot)
        return fn()

    def leave(self) -> None:
        self._stepper.leave(self._slot)
