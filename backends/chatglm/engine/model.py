"""The model side of the engine: chatglm.cpp Pipelines (one per slot, each with its own KV cache),
the family's chat template (families.py: ChatGLM2, ChatGLM3, GLM-4, GLM-4V), and the token loop, which reuses
the part of a prompt that a slot's cache already holds.

Pipeline.generate() is broken in chatglm-cpp 0.4.2 and Pipeline.chat() truncates long prompts in
silence, so the token loop is ours (``model.generate_next_token``): it counts tokens exactly,
honours max_tokens and stop strings, and stops between any two tokens when the client is gone.

Prefix reuse: a slot remembers the token ids whose keys and values its cache holds. A new prompt
that starts with the same ids (the next turn of a chat: the history, then something new) skips
them and evaluates only the rest. Stock chatglm-cpp 0.4.2 evaluates one token per call once
anything is cached (it masks a batch only when the cache is empty), so there the rest goes in at
decode speed and reuse is taken only when that is cheaper than evaluating the prompt cold.
aigate's patched build (``0.4.2+aigate``) masks any batch, so the rest goes in as one batch.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import chatglm_cpp
import numpy as np

from backends.base import (
    ChatRequest,
    ContextLengthExceeded,
    Event,
    Finish,
    FinishReason,
    InvalidImage,
    InvalidRequest,
    Message,
    TextDelta,
    Tool,
    TooManyImages,
    UnsupportedContent,
    Usage,
)
from backends.chatglm.chatglm3_tools import ReplySplitter
from backends.chatglm.engine.families import FAMILIES
from backends.chatglm.ggml_file import ModelFile, read_tokenizer_vocab
from backends.stops import StopMatcher

log = logging.getLogger(__name__)

DEFAULT_TEMPERATURE = 0.95  # chatglm.cpp's own defaults, used when the client sends none
DEFAULT_TOP_P = 0.7
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON may carry lone ones; no tokenizer takes them
PATCHED = "+aigate" in chatglm_cpp.__version__


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


class ByteDetokenizer:
    """Byte-level BPE (GLM-4): a token is a run of bytes that may end inside a UTF-8 character, so
    the bytes go through an incremental UTF-8 decoder that holds an unfinished character back until
    its last byte comes (and writes U+FFFD for bytes that can never form one)."""

    def __init__(self, vocab: list[bytes]) -> None:
        self._vocab = vocab
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, token: int) -> str:
        return str(self._utf8.decode(self._vocab[token]))

    def flush(self) -> str:
        return str(self._utf8.decode(b"", final=True))


@dataclass
class StepCosts:
    """Seconds per prompt token evaluated cold and per decode step, as measured (moving averages):
    what decides, on a stock build, whether reusing a prefix beats evaluating the prompt cold."""

    prefill: float = 0.0
    decode: float = 0.0

    def note_prefill(self, seconds: float, tokens: int) -> None:
        if tokens >= 16:  # a few tokens say more about the call's overhead than about a token's cost
            self.prefill = _average(self.prefill, seconds / tokens)

    def note_decode(self, seconds: float) -> None:
        self.decode = _average(self.decode, seconds)


def _average(old: float, new: float) -> float:
    return new if old == 0 else 0.9 * old + 0.1 * new


class Model:
    """One model file loaded once per slot; what the slots share (tokenizer, template, costs)."""

    def __init__(self, model: ModelFile, context_length: int, slots: int) -> None:
        self.file = model
        self.family = FAMILIES[model.model_type]
        self._vocab = read_tokenizer_vocab(model) if self.family.byte_level else []
        # An image takes the vision tower's tokens (and boi, eoi) where the prompt has 3 marker tokens.
        self.image_extra = model.vision.image_tokens - 3 if model.vision is not None else 0
        self.context_length = context_length
        self.prefill_rows = prefill_rows(model, context_length)
        self.costs = StepCosts()
        pipelines = [chatglm_cpp.Pipeline(str(model.path), max_length=context_length) for _ in range(slots)]
        self._tokenizer = pipelines[0].tokenizer
        config = pipelines[0].model.config
        self._end_ids = frozenset([config.eos_token_id, *config.extra_eos_token_ids])
        self.slots = [Slot(self, p) for p in pipelines]
        for slot in self.slots:
            slot.warm_up()

    def prompt_ids(self, request: ChatRequest) -> list[int]:
        """The request as the model reads it; ContextLengthExceeded if it leaves no room to answer."""
        ids = self.request_ids(request)
        positions = self.positions(request, ids)
        if positions >= self.context_length:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.context_length} tokens, and your prompt "
                f"takes {positions} tokens. Shorten it.", param="messages" if request.prompt is None else "prompt")
        return ids

    def images_wanted(self, request: ChatRequest) -> tuple[int, int]:
        """(the side in pixels of the image the model takes, how many the request has: 0 or 1).
        Raises UnsupportedContent (a model without vision), TooManyImages. Reads no pixel: a request
        whose images come later is checked with this before the worker decodes them."""
        count = sum(len(m.images) for m in request.messages)
        vision = self.file.vision
        if count and vision is None:
            raise UnsupportedContent(f"{self.family.name} models take text only; send the request without images.",
                                     param="messages")
        if count > 1:
            raise TooManyImages(f"{self.family.name} reads one image per request; this one has {count}.",
                                param="messages")
        return (0 if vision is None else vision.image_size), count

    def request_ids(self, request: ChatRequest) -> list[int]:
        """The request as the model reads it, however long."""
        if request.prompt is not None:  # plain continuation, as chatglm.cpp's generate() does
            special = self.file.special_token_ids
            return [*(special[t] for t in self.family.prefix), *self._encode(request.prompt)]
        turn = next((i for i, m in enumerate(request.messages) if m.images), None)
        return self.family.encode_chat(request.messages, request.tools, self._encode, self.file.special_token_ids,
                                       image_turn=turn)

    def positions(self, request: ChatRequest, ids: list[int]) -> int:
        """The context positions the request's ``ids`` take (an image takes more than its marker)."""
        return len(ids) + (self.image_extra if self.images_wanted(request)[1] else 0)

    def detokenize(self, ids: list[int]) -> str:
        """The text of ``ids``: ordinary pieces decoded, special tokens by their names; InvalidRequest
        for an id the vocabulary has not (padding, or past it)."""
        names = {i: name for name, i in self.file.special_token_ids.items()}
        pieces = self.file.tokenizer_pieces
        for at, token in enumerate(ids):
            if not 0 <= token < pieces and token not in names:
                raise InvalidRequest(f"{token} (tokens[{at}]) is not a token id of this model: its ids are 0 to "
                                     f"{pieces - 1} and its special tokens ({min(names)} to {max(names)}).",
                                     param="tokens")
        text, run = [], []
        for token in [*ids, -1]:
            if 0 <= token < pieces:
                run.append(token)
                continue
            if run:
                text.append(self._decode(run))
                run = []
            if token in names:
                text.append(names[token])
        return "".join(text)

    def _decode(self, ids: list[int]) -> str:
        if self.family.byte_level:
            return b"".join(self._vocab[i] for i in ids).decode("utf-8", "replace")
        return str(self._tokenizer.decode(ids))

    def image(self, request: ChatRequest) -> Any:
        """The request's image as chatglm.cpp takes it, or None. The worker sends pixels of the vision
        tower's size; anything else is refused here (chatglm.cpp would abort on it)."""
        size, count = self.images_wanted(request)
        if not count:
            return None
        image = next(im for m in request.messages for im in m.images)
        try:
            pixels = base64.b64decode(image.data, validate=True)
        except (binascii.Error, ValueError):
            pixels = b""
        if (image.width, image.height) != (size, size) or len(pixels) != size * size * 3:
            raise InvalidImage("The image was not prepared for this model.", param="messages")
        return chatglm_cpp._C.Image(np.frombuffer(pixels, np.uint8).reshape(size, size, 3).copy())

    def encode_chat(self, messages: tuple[Message, ...], tools: tuple[Tool, ...] = ()) -> list[int]:
        """The family's chat template, built here rather than by chatglm.cpp's apply_chat_template,
        which can neither write a turn's metadata line (a tool call's name) nor be kept from
        dropping the oldest tokens of a long prompt in silence."""
        return self.family.encode_chat(messages, tools, self._encode, self.file.special_token_ids)

    def _encode(self, text: str) -> list[int]:
        """Ordinary-text ids of text (chatglm.cpp's encode adds [gMASK] sop in front)."""
        text = _SURROGATE.sub("\ufffd", text)
        return list(self._tokenizer.encode(text, 1 << 30))[2:] if text else []

    def generation_config(self, request: ChatRequest, max_new: int) -> Any:
        temperature = DEFAULT_TEMPERATURE if request.temperature is None else request.temperature
        return chatglm_cpp._C.GenerationConfig(
            max_length=self.context_length, max_new_tokens=max_new, max_context_length=self.context_length,
            do_sample=temperature > 0, top_k=0, top_p=DEFAULT_TOP_P if request.top_p is None else request.top_p,
            temperature=temperature, repetition_penalty=1.0)

    def is_end(self, token: int) -> bool:
        """End of text: eos, or any id past the ordinary pieces (special or padding ids; decoding a
        padding id would crash the tokenizer)."""
        return token in self._end_ids or not 0 <= token < self.file.tokenizer_pieces

    def detokenizer(self) -> Detokenizer | ByteDetokenizer:
        return ByteDetokenizer(self._vocab) if self.family.byte_level else Detokenizer(self._tokenizer.decode)

    def reply_splitter(self, request: ChatRequest) -> ReplySplitter:
        tools = self.family.tools
        return ReplySplitter(bool(request.tools), raw=request.prompt is not None or not self.family.metadata_line,
                             **({"parse": tools.parse_call} if tools else {}))


PREFILL_SCORES_BYTES = 256 << 20  # the attention scores of one prefill graph, at most (float32)


def prefill_rows(model: ModelFile, context_length: int) -> int:
    """How many prompt tokens one graph evaluates (aigate's build; a stock one evaluates the prompt
    whole): chatglm.cpp keeps every query row's score for every key and head, so a 20,000-token prompt
    at once would take 6.4 GB on the 4-head demo model (and time that grows with its square); in pieces
    of 512 rows, 256 MB at most, at its whole 32,768-token context."""
    per_row = 4 * model.config.num_attention_heads * context_length
    return max(32, min(512, PREFILL_SCORES_BYTES // per_row))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Slot:
    """One Pipeline and the token ids its KV cache holds (positions 0..len-1)."""

    def __init__(self, model: Model, pipeline: Any) -> None:
        self.model = model
        self._pipeline = pipeline
        self._ids: list[int] = []
        self._cached = 0  # how many of _ids the cache holds

    @property
    def cached(self) -> list[int]:
        return self._ids[:self._cached]

    def warm_up(self) -> None:
        """Evaluate one prompt of a few hundred tokens before serving. chatglm.cpp sizes its compute
        buffer by the first graph it runs; when that is a short prompt, a long generation later
        outgrows the buffer and corrupts the heap (`double free or corruption` after ~800 tokens on
        the small demo architecture). A first graph of ~2·sqrt(context) query rows covers every
        decode graph up to the full context."""
        n = min(self.model.context_length - 1, max(128, 2 * math.isqrt(self.model.context_length) + 2))
        special = self.model.file.special_token_ids
        family, image = self.model.family, None
        marker = [special[t] for t in family.image_marker]
        if family.images:  # the first graph holds the vision tower too (its image a black square)
            n = min(n, self.model.context_length - 1 - self.model.image_extra)
            size = self.model.file.vision.image_size  # type: ignore[union-attr]
            image = chatglm_cpp._C.Image(np.zeros((size, size, 3), np.uint8))
        ids = [*(special[t] for t in family.prefix), *marker, *[special["[MASK]"]] * (n - 2 - len(marker))]
        config = chatglm_cpp._C.GenerationConfig(max_length=self.model.context_length, max_new_tokens=1,
                                                 max_context_length=self.model.context_length, do_sample=False)
        started = time.monotonic()
        self._pipeline.model.generate_next_token(ids, image, config, 0, len(ids))
        self.model.costs.note_prefill(time.monotonic() - started, len(ids))
        self._ids, self._cached = [], 0  # nothing a request would want to reuse

    def reusable(self, prompt: list[int]) -> int:
        """How many leading tokens of ``prompt`` to take from the cache (at least one is evaluated)."""
        reuse = min(common_prefix(self._ids[:self._cached], prompt), len(prompt) - 1)
        if reuse <= 0:
            return 0
        if PATCHED:
            return reuse
        costs = self.model.costs  # stock build: the rest at decode speed, unless a cold prefill is cheaper
        cheaper = 0 < (len(prompt) - reuse) * costs.decode < len(prompt) * costs.prefill
        return reuse if cheaper else 0

    def generate(self, request: ChatRequest, prompt: list[int], cancelled: Callable[[], bool]) -> Iterator[Event]:
        """Events for one answer to ``prompt``; ends early, without a Finish, once ``cancelled()``."""
        image = self.model.image(request)
        extra = self.model.image_extra if image is not None else 0  # positions the image takes beyond its 3 ids
        room = self.model.context_length - len(prompt) - extra
        max_new = room if request.max_tokens is None else min(request.max_tokens, room)
        config = self.model.generation_config(request, max_new)
        stop = StopMatcher(request.stop)
        reply = self.model.reply_splitter(request)
        detok = self.model.detokenizer()
        reuse = 0 if image is not None else self.reusable(prompt)
        self._ids, self._cached = list(prompt), 0  # until a step returns, what the cache holds is unknown
        ids, model = self._ids, self._pipeline.model
        started = time.monotonic()
        token = self._prefill(prompt, reuse, config, image)
        if reuse == 0:
            self.model.costs.note_prefill(time.monotonic() - started, len(prompt))
        generated = 0
        reason: FinishReason = "length"
        while True:
            ids.append(token)
            generated += 1
            if self.model.is_end(token):
                reason = "stop"
                break
            text = stop.feed(reply.feed(detok.add(token)))
            if text:
                yield TextDelta(text)
            if stop.stopped:
                reason = "stop"
                break
            if generated >= max_new:
                break
            if cancelled():
                return
            step = time.monotonic()
            token = model.generate_next_token(ids, None, config, len(ids) - 1 + extra, len(prompt))
            self._cached = len(ids) if image is None else 0  # with an image, cache positions are not the ids
            self.model.costs.note_decode(time.monotonic() - step)
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
        yield Finish(reason, Usage(len(prompt) + extra, generated, cached_tokens=reuse), stop.matched)

    def _prefill(self, prompt: list[int], reuse: int, config: Any, image: Any = None) -> int:
        """Evaluate what the cache lacks of ``prompt``; the first new token."""
        model = self._pipeline.model
        if PATCHED and image is None:  # in pieces: a graph holds each new token's scores against every key
            rows = self.model.prefill_rows
            for start in range(reuse, len(prompt), rows):
                end = min(start + rows, len(prompt))
                token = model.generate_next_token(prompt[:end], None, config, start, len(prompt))
                self._cached = end
        elif reuse == 0 or PATCHED:
            token = model.generate_next_token(prompt, image, config, reuse, len(prompt))
        else:  # stock build: one token a call once the cache holds something
            for i in range(reuse, len(prompt)):
                token = model.generate_next_token(prompt[:i + 1], None, config, i, len(prompt))
                self._cached = i + 1
        self._cached = len(prompt) if image is None else 0
        return int(token)
