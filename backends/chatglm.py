"""chatglm.cpp: one Pipeline per slot in each worker, driven token by token.

Pipeline.generate() is broken in chatglm-cpp 0.4.2 and Pipeline.chat() truncates long prompts
in silence, so this module runs the token loop itself (``model.generate_next_token``), which
lets it count tokens exactly, honour max_tokens and stop strings, stop the moment the client
goes away, and give the gevent hub a turn between steps (a step holds the GIL throughout).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterator
from typing import Any

from backends.base import (ChatRequest, ContextLengthExceeded, Embeddings, Event, Finish, InvalidRequest, Message,
                           ModelInfo, TextDelta, Tool, Unavailable, Usage)
from backends.chatglm_tools import ReplySplitter, render_call, tools_system_prompt
from backends.ggml_file import ModelFile
from backends.slots import GenerationSlots
from backends.stops import StopMatcher

log = logging.getLogger(__name__)

CHATGLM_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "observation"}
DEFAULT_TEMPERATURE = 0.95  # chatglm.cpp's own defaults, used when the client sends none
DEFAULT_TOP_P = 0.7


def hub_yield() -> Callable[[], None]:
    """gevent.idle under a gevent worker (sleep(0) would starve timers and I/O); else nothing."""
    try:
        from gevent import idle, monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return lambda: None
    return idle if monkey.is_module_patched("socket") else (lambda: None)


class Detokenizer:
    """Turns token ids into text pieces as they come.

    Each new token is decoded together with the one before it, because sentencepiece drops the
    leading space of the first piece it decodes; text ending in an unfinished UTF-8 sequence
    (byte-fallback tokens) is held until the sequence is complete.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # end of what was already emitted
        self._prefix_text = ""

    def add(self, token: int) -> str:
        self._ids.append(token)
        try:
            text = self._decode(self._ids[self._prefix:])
        except UnicodeDecodeError:
            return ""
        if len(text) <= len(self._prefix_text) or text.endswith("\ufffd"):
            return ""
        delta = text[len(self._prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._safe_decode(self._ids[self._prefix:self._read])
        return delta

    def flush(self) -> str:
        text = self._safe_decode(self._ids[self._prefix:])
        return text[len(self._prefix_text):]

    def _safe_decode(self, ids: list[int]) -> str:
        try:
            return self._decode(ids)
        except UnicodeDecodeError:
            return "\ufffd"


class ChatGLMBackend:
    name = "chatglm"

    def __init__(self, model: ModelFile, *, model_id: str, owned_by: str, max_length: int | None,
                 slots: GenerationSlots) -> None:
        import chatglm_cpp  # imported here: loading the extension is the backend's business only

        self._chatglm = chatglm_cpp
        self._model = model
        self.slots = slots
        self.context_length = max_length or model.config.max_length
        self._info = ModelInfo(model_id, owned_by, int(model.path.stat().st_mtime))
        self._free: list[Any] = []
        self._loaded = False
        self._load_error: str | None = None
        self._yield = hub_yield()

    def load(self) -> None:
        try:
            # One Pipeline (one KV cache) per generation slot: the slots keep at most that many
            # generations running on the machine, so one is always free when a slot is won.
            pipelines = [self._chatglm.Pipeline(str(self._model.path), max_length=self.context_length)
                         for _ in range(self.slots.slots)]
        except Exception as exc:  # chatglm.cpp's RuntimeError on a file the checks let through
            self._load_error = f"loading {self._model.path} failed: {exc}"
            raise
        self._tokenizer = pipelines[0].tokenizer
        config = pipelines[0].model.config
        self._end_ids = frozenset([config.eos_token_id, *config.extra_eos_token_ids])
        self._free = pipelines
        self._loaded = True
        log.info("loaded %s (%s), context %d tokens", self._info.id, self._model.path, self.context_length)

    def readiness(self) -> str | None:
        if self._loaded:
            return None
        return self._load_error or f"model {self._info.id} is loading"

    def stats(self) -> dict[str, float]:
        running, waiting = self.slots.counts()
        return {"generations_running": running, "requests_waiting": waiting}

    def models(self) -> list[ModelInfo]:
        return [self._info]

    def embed(self, model: str, inputs: list[str]) -> Embeddings:
        raise InvalidRequest(f"{model} is a chat model and makes no embeddings; use an embedding model "
                             "(Cloudflare's @cf/baai/bge-*).", param="model", extra={"code": "model_not_supported"})

    def chat(self, request: ChatRequest) -> Generator[Event, None, None]:
        if not self._loaded:
            raise Unavailable(self.readiness() or "", retry_after=None if self._load_error else 2)
        if request.prompt is not None:  # plain continuation, as chatglm.cpp's generate() does
            prompt = [self._model.special_token_ids["[gMASK]"], self._model.special_token_ids["sop"],
                      *self._sp_encode(request.prompt)]
        else:
            prompt = self._encode(request.messages, request.tools)
        room = self.context_length - len(prompt)
        if room < 1:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.context_length} tokens, and your prompt "
                f"takes {len(prompt)} tokens. Shorten it.", param="messages" if request.prompt is None else "prompt")
        max_new = room if request.max_tokens is None else min(request.max_tokens, room)
        temperature = DEFAULT_TEMPERATURE if request.temperature is None else request.temperature
        config = self._chatglm._C.GenerationConfig(
            max_length=self.context_length, max_new_tokens=max_new, max_context_length=self.context_length,
            do_sample=temperature > 0, top_k=0,
            top_p=DEFAULT_TOP_P if request.top_p is None else request.top_p,
            temperature=temperature, repetition_penalty=1.0)
        with self.slots.acquire():
            pipeline = self._free.pop()
            try:
                yield from self._generate(pipeline, prompt, config, max_new, StopMatcher(request.stop),
                                          ReplySplitter(bool(request.tools), raw=request.prompt is not None))
            finally:
                self._free.append(pipeline)

    def _encode(self, messages: tuple[Message, ...], tools: tuple[Tool, ...] = ()) -> list[int]:
        """ChatGLM3's chat template, built here rather than by chatglm.cpp's apply_chat_template,
        which can neither write a turn's metadata line (a tool call's name) nor be kept from
        dropping the oldest tokens of a long prompt in silence."""
        special = self._model.special_token_ids
        ids = [special["[gMASK]"], special["sop"]]

        def turn(role: str, content: str, metadata: str = "") -> None:
            ids.append(special[f"<|{role}|>"])
            ids.extend(self._sp_encode(metadata + "\n"))
            ids.extend(self._sp_encode(content))

        if tools:
            turn("system", tools_system_prompt(tools))
        for m in messages:
            if m.role == "assistant" and m.tool_calls:
                if m.content:
                    turn("assistant", m.content)
                for call in m.tool_calls:
                    turn("assistant", render_call(call), metadata=call.name)
            else:
                turn(CHATGLM_ROLES[m.role], m.content)
        ids.append(special["<|assistant|>"])
        return ids

    def _sp_encode(self, text: str) -> list[int]:
        """Sentencepiece ids of text (chatglm.cpp's encode adds [gMASK] sop in front)."""
        return list(self._tokenizer.encode(text, 1 << 30))[2:] if text else []

    def _generate(self, pipeline, prompt: list[int], config, max_new: int, stop: StopMatcher,
                  reply: ReplySplitter) -> Iterator[Event]:
        # The first step evaluates the whole prompt in one C++ call: chatglm.cpp evaluates a single
        # new token whenever n_past > 0, so the prefill cannot be split to let the hub run between parts.
        model = pipeline.model
        ids = list(prompt)
        n_past = 0
        detok = Detokenizer(self._tokenizer.decode)
        generated = 0
        reason = "length"
        while generated < max_new:
            token = model.generate_next_token(ids, None, config, n_past, len(prompt))
            n_past = len(ids)
            ids.append(token)
            generated += 1
            # End of text: eos, or any id past the ordinary pieces (special or padding ids;
            # decoding a padding id would crash the tokenizer).
            if token in self._end_ids or not 0 <= token < self._model.tokenizer_pieces:
                reason = "stop"
                break
            text = stop.feed(reply.feed(detok.add(token)))
            if text:
                yield TextDelta(text)
            if stop.stopped:
                reason = "stop"
                break
            self._yield()
        call = None
        if not stop.stopped:
            content = reply.feed(detok.flush())
            rest, call = reply.finish()
            tail = stop.feed(content + rest) + stop.flush()
            if tail:
                yield TextDelta(tail)
        if call is not None:
            yield call
            reason = "tool_calls"
        yield Finish(reason, Usage(len(prompt), generated))  # type: ignore[arg-type]
