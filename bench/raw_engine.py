"""The raw engine of benchmark 1: chatglm.cpp's model stepped by hand, one generate_next_token a
token and nothing else (Pipeline._stream_generate_ids also counts the tokens again every step).
Like aigate's engine it remembers what its KV cache holds and evaluates only what a new prompt
adds to it (on the patched build, which masks a batch after a cached prefix): the same work as
aigate's, so that the comparison is like for like on every prompt, turn 2 included.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import chatglm_cpp
from common import Timing  # first: common also puts the project's root on sys.path, for backends

from backends.chatglm.engine.model import PATCHED, common_prefix


class RawEngine:
    def __init__(self, path: str, context: int = 2048) -> None:
        self.pipeline = chatglm_cpp.Pipeline(path, max_length=context)
        self.tokenizer = self.pipeline.tokenizer
        self._context = context
        config = self.pipeline.model.config
        self._ends = {config.eos_token_id, *config.extra_eos_token_ids}
        self._cached: list[int] = []  # the ids whose keys and values the cache holds
        # chatglm.cpp sizes its compute buffer by the first graph: a prompt of ~2·sqrt(context) tokens
        # first, as aigate's engine does (a short first graph can let a long answer corrupt the heap).
        list(self.tokens(self.prompt_ids([{"role": "user", "content": "warm up " * 22}]), 1, reuse=False))

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(
            [chatglm_cpp.ChatMessage(role=m["role"], content=m["content"]) for m in messages], 1 << 30))

    def count(self, text: str) -> int:
        """The tokens of ``text`` (encode adds [gMASK] sop in front)."""
        return len(self.tokenizer.encode(text, 1 << 30)) - 2

    def decode_rate(self, answer: Timing) -> float:
        """Tokens after the first over the time after the first, the tokens counted by re-encoding the
        answer's text: the same count for every contender, whatever pieces it sent."""
        return (self.count(answer.text) - 1) / (answer.total - answer.ttft) if answer.total > answer.ttft else 0.0

    def timed(self, prompt: list[int], max_new: int, reuse: bool = True) -> Timing:
        """An answer to ``prompt`` timed as a client would: from the first step (the ids are ready:
        the leanest baseline) to the first token and to the last."""
        started, first, out = time.perf_counter(), 0.0, []
        for token in self.tokens(prompt, max_new, reuse):
            first = first or time.perf_counter() - started
            out.append(token)
        return Timing(first, time.perf_counter() - started, self.tokenizer.decode(out))

    def tokens(self, prompt: list[int], max_new: int, reuse: bool = True) -> Iterator[int]:
        """Greedy tokens for ``prompt``, at most as many as the context has room for (aigate's rule);
        ``reuse``: start from the cache's common prefix, as aigate does."""
        max_new = min(max_new, self._context - len(prompt))
        config: Any = chatglm_cpp._C.GenerationConfig(max_length=self._context, max_new_tokens=max_new,
                                                      max_context_length=self._context, do_sample=False)
        ids = list(prompt)
        n_past = min(common_prefix(self._cached, ids), len(ids) - 1) if reuse and PATCHED else 0
        self._cached = []  # until the first step returns
        model = self.pipeline.model
        token = model.generate_next_token(ids, None, config, n_past, len(prompt))
        self._cached = ids  # grows with every step; the last token yielded is never evaluated
        for _ in range(max_new - 1):
            yield token
            if token in self._ends:
                return
            ids.append(token)
            token = model.generate_next_token(ids, None, config, len(ids) - 1, len(prompt))
        yield token
