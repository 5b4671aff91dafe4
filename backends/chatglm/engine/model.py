"""The model side of the engine: the model's slots (each a KV cache of its own), the family's chat template
(families.py: ChatGLM2, ChatGLM3, GLM-4, GLM-4V), and the token loop, which reuses the part of a prompt that a
slot's cache already holds.

How a slot's tokens are evaluated (runners.py): aigate's build of chatglm.cpp (``0.4.2+aigate.3``) holds every
slot in one Pipeline and the stepper evaluates all running sequences together, the weights read once a step
(stepper.py); any other build has a Pipeline per slot, and their calls take turns.

Pipeline.generate() is broken in chatglm-cpp 0.4.2 and Pipeline.chat() truncates long prompts in
silence, so the token loop is ours (``model.generate_next_token``): it counts tokens exactly,
honours max_tokens and stop strings, and stops between any two tokens when the client is gone.

Prefix reuse: a slot remembers the token ids whose keys and values its cache holds. A new prompt
that starts with the same ids (the next turn of a chat: the history, then something new) skips
them and evaluates only the rest. Stock chatglm-cpp 0.4.2 evaluates one token per call once
anything is cached (it masks a batch only when the cache is empty), so there the rest goes in at
decode speed and reuse is taken only when that is cheaper than evaluating the prompt cold.
aigate's patched build (``0.4.2+aigate``) masks any batch, so the rest goes in as one batch.

Two ways to the next token. Plain requests keep chatglm.cpp's own sampler (``generate_next_token``), the
fastest. A request that needs more (a grammar's constraint, logprobs, a seed, logit_bias, penalties, or
n > 1 choices) takes the logits (``next_token_logits``, aigate's build from 0.4.2+aigate.2) and chooses in
Python (sampler.py). n choices run one after another on the slot: the later ones find the prompt cached.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import logging
import math
import re
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
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
    NotSupportedByModel,
    TokenLogprob,
    Tool,
    TooManyImages,
    TopLogprob,
    UnsupportedContent,
    Usage,
)
from backends.base import Control as ControlName
from backends.chatglm.chatglm3_tools import ReplySplitter
from backends.chatglm.engine import sampler
from backends.chatglm.engine.answer import AnswerText
from backends.chatglm.engine.families import FAMILIES
from backends.chatglm.engine.grammar import Constraint, Grammars, answer_grammar
from backends.chatglm.engine.runners import BATCHED, BatchedRunner, LegacyRunner, Runner
from backends.chatglm.engine.stepper import Stepper
from backends.chatglm.engine.vocab import SPECIAL, token_bytes
from backends.chatglm.ggml_file import ModelFile, read_tokenizer_vocab
from backends.stops import StopMatcher

log = logging.getLogger(__name__)

DEFAULT_TEMPERATURE = 0.95  # chatglm.cpp's own defaults, used when the client sends none
DEFAULT_TOP_P = 0.7
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON may carry lone ones; no tokenizer takes them
PATCHED = "+aigate" in chatglm_cpp.__version__
LOGITS = hasattr(chatglm_cpp._C.BaseModelForCausalLM, "next_token_logits")  # aigate's build from +aigate.2
SAMPLING_CONTROLS: frozenset[ControlName] = frozenset({"logprobs", "seed", "logit_bias", "n", "penalties"})


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
    """One model file and its slots; what the slots share (tokenizer, template, costs)."""

    def __init__(self, model: ModelFile, context_length: int, slots: int) -> None:
        self.file = model
        self.family = FAMILIES[model.model_type]
        self._vocab = read_tokenizer_vocab(model) if self.family.byte_level else []
        # An image takes the vision tower's tokens (and boi, eoi) where the prompt has 3 marker tokens.
        self.image_extra = model.vision.image_tokens - 3 if model.vision is not None else 0
        self.context_length = context_length
        self.prefill_rows = prefill_rows(model, context_length)
        self.costs = StepCosts()
        self.stepper: Stepper | None = None
        pipelines = [chatglm_cpp.Pipeline(str(model.path), max_length=context_length, num_slots=slots)] if BATCHED \
            else [chatglm_cpp.Pipeline(str(model.path), max_length=context_length) for _ in range(slots)]
        self._tokenizer = pipelines[0].tokenizer
        config = pipelines[0].model.config
        self._end_ids = frozenset([config.eos_token_id, *config.extra_eos_token_ids])
        self.vocab_size = config.vocab_size
        # The logits path: every id's bytes (constrained answers, logprobs) and the grammars.
        self.tokens = token_bytes(model) if LOGITS else []
        self.real_tokens = max((i + 1 for i, t in enumerate(self.tokens) if t), default=0)  # padding after
        self.grammars = Grammars(model, self.family, self.tokens, self._encode, self._end_ids) if LOGITS else None
        runners: list[Runner]
        if BATCHED:
            stepper = self.stepper = Stepper(pipelines[0].model, self.vocab_size, slots, self.prefill_rows,
                                             self.is_end, name=f"stepper {model.path.name}")
            # on the stepper's thread, as every call to the model: the current ggml keeps a team of OpenMP threads
            # per calling thread, and a second team would spin beside the first after each of its graphs
            stepper.call(lambda: warm_up(self, pipelines[0].model))
            stepper.times.per_prompt_token = self.costs.prefill
            runners = [BatchedRunner(stepper, pipelines[0].model, i) for i in range(slots)]
        else:
            for pipeline in pipelines:
                warm_up(self, pipeline.model)
            runners = [LegacyRunner(p.model) for p in pipelines]
        self.slots = [Slot(self, runner) for runner in runners]

    def close(self) -> None:
        """Stop the stepper and let go of the Pipelines (chatglm.cpp frees their memory once nothing holds
        them). The slots must be idle. The grammars go too: llguidance's tokenizer, a Rust object the
        collector cannot look into, holds this model's encoder, a cycle that would keep it all alive."""
        if self.stepper is not None:
            self.stepper.close()
            self.stepper = None
        self.slots = []
        self.grammars = None

    @property
    def controls(self) -> frozenset[ControlName]:
        """The sampling controls this build honours (ModelInfo.controls)."""
        return controls_of(self.file)

    @property
    def constrains(self) -> bool:
        """Answers can be held to a JSON schema or a forced tool call."""
        return self.grammars is not None

    def check(self, request: ChatRequest) -> None:
        """Refuse, before the request takes a slot, what this model cannot honour: the logits path on a build
        without it (NotSupportedByModel), a logit_bias id not of this vocabulary, a schema that cannot
        compile (InvalidRequest), a forced tool call the family cannot make (ToolsNotSupported)."""
        if not LOGITS:
            asked = self._logits_asked(request)
            if asked:
                raise NotSupportedByModel(
                    f"{asked[0]} needs aigate's build of chatglm-cpp (0.4.2+aigate.2: scripts/build_chatglm_cpp.sh); "
                    f"this engine runs chatglm-cpp {chatglm_cpp.__version__}. Send the request without it.",
                    param=asked[1])
            return
        for token, _ in request.logit_bias:
            if not 0 <= token < self.real_tokens:
                raise InvalidRequest(f"logit_bias has {token}, which is not a token id of this model: its ids are 0 "
                                     f"to {self.real_tokens - 1}.", param="logit_bias")
        if self.grammars is not None:
            self.grammars.constraint(request)  # compiled (and cached) now: its errors before the slot

    def _logits_asked(self, request: ChatRequest) -> tuple[str, str | None] | None:
        """What of the request needs the logits path, in words, and its param (None: nothing)."""
        control = next(iter(request.controls_asked.values()), None)
        if control is not None:
            return control, control
        if answer_grammar(self.family, request, False) is not None:
            param = request.response_format.param if request.response_format else "tool_choice"
            return "An answer held to a JSON schema or a tool call", param
        return None

    def sampled(self, request: ChatRequest) -> bool:
        """Whether the request takes the logits path (else chatglm.cpp's own sampler)."""
        return LOGITS and (self._logits_asked(request) is not None)

    def sampling(self, request: ChatRequest) -> sampler.Params:
        return sampler.Params(*_temperature_top_p(request), request.presence_penalty or 0.0,
                              request.frequency_penalty or 0.0, request.logit_bias, request.logprobs,
                              request.top_logprobs)

    def token_logprob(self, pick: sampler.Pick) -> TokenLogprob:
        top = []
        for token, logprob in pick.top:
            text, raw = self._token_text(token)
            top.append(TopLogprob(text, logprob, raw))
        text, raw = self._token_text(pick.token)
        return TokenLogprob(text, pick.logprob, raw, tuple(top))

    def _token_text(self, token: int) -> tuple[str, bytes]:
        """A token's text and bytes (a special token's: its name)."""
        raw = self.tokens[token]
        raw = raw[len(SPECIAL):] if raw.startswith(SPECIAL) else raw
        return raw.decode("utf-8", "replace"), raw

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
        temperature, top_p = _temperature_top_p(request)
        return chatglm_cpp._C.GenerationConfig(
            max_length=self.context_length, max_new_tokens=max_new, max_context_length=self.context_length,
            do_sample=temperature > 0, top_k=0, top_p=top_p, temperature=temperature, repetition_penalty=1.0)

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


def controls_of(file: ModelFile) -> frozenset[ControlName]:
    """The sampling controls a model honours on this build, known from its file before it is loaded."""
    if not LOGITS:
        return frozenset()
    return SAMPLING_CONTROLS | ({"tool_choice"} if FAMILIES[file.model_type].tools else frozenset())


def _temperature_top_p(request: ChatRequest) -> tuple[float, float]:
    """What the request asks for, chatglm.cpp's defaults where it asks for nothing."""
    return (DEFAULT_TEMPERATURE if request.temperature is None else request.temperature,
            DEFAULT_TOP_P if request.top_p is None else request.top_p)


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


def warm_up(model: Model, engine: Any) -> None:
    """Evaluate one prompt of a few hundred tokens before serving. chatglm.cpp sizes its compute
    buffer by the first graph it runs; when that is a short prompt, a long generation later
    outgrows the buffer and corrupts the heap (`double free or corruption` after ~800 tokens on
    the small demo architecture). A first graph of ~2·sqrt(context) query rows covers every
    decode graph up to the full context."""
    n = min(model.context_length - 1, max(128, 2 * math.isqrt(model.context_length) + 2))
    special = model.file.special_token_ids
    family, image = model.family, None
    marker = [special[t] for t in family.image_marker]
    if family.images:  # the first graph holds the vision tower too (its image a black square)
        n = min(n, model.context_length - 1 - model.image_extra)
        size = model.file.vision.image_size  # type: ignore[union-attr]
        image = chatglm_cpp._C.Image(np.zeros((size, size, 3), np.uint8))
    ids = [*(special[t] for t in family.prefix), *marker, *[special["[MASK]"]] * (n - 2 - len(marker))]
    config = chatglm_cpp._C.GenerationConfig(max_length=model.context_length, max_new_tokens=1,
                                             max_context_length=model.context_length, do_sample=False)
    started = time.monotonic()
    engine.generate_next_token(ids, image, config, 0, len(ids))
    model.costs.note_prefill(time.monotonic() - started, len(ids))


class Slot:
    """A KV cache (through its runner) and the token ids it holds (positions 0..len-1)."""

    def __init__(self, model: Model, runner: Runner) -> None:
        self.model = model
        self.runner = runner
        self._ids: list[int] = []
        self._cached = 0  # how many of _ids the cache holds
        self._logits: np.ndarray | None = None  # the logits path's buffers, made at its first request
        self._bitmask = np.zeros(0, np.int32)

    @property
    def cached(self) -> list[int]:
        return self._ids[:self._cached]

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
        """Events for the answers to ``prompt`` (request.n of them, one after another, each ending in its
        Finish); ends early, without a Finish, once ``cancelled()``."""
        try:
            for choice in range(request.n):
                if choice and cancelled():
                    return
                if not (yield from self._answer(request, prompt, cancelled, choice)):
                    return
        finally:
            self.runner.leave()

    def _answer(self, request: ChatRequest, prompt: list[int], cancelled: Callable[[], bool],
                choice: int) -> Generator[Event, None, bool]:
        """One answer's events; False when it was cancelled before its Finish."""
        model = self.model
        image = model.image(request)
        extra = model.image_extra if image is not None else 0  # positions the image takes beyond its 3 ids
        room = model.context_length - len(prompt) - extra
        max_new = room if request.max_tokens is None else min(request.max_tokens, room)
        step = self._decoder(request, max_new, choice)
        text = AnswerText(step.detokenizer(), model.reply_splitter(request), StopMatcher(request.stop), choice)
        if isinstance(step, Sampled) and step.constraint is not None and model.grammars is not None \
                and model.grammars.dummy_prefix:
            text.reply.drop_dummy_prefix()  # the token bytes keep the " \n " turn start the decoder would drop
        reuse = 0 if image is not None else self.reusable(prompt)
        self._ids, self._cached = list(prompt), 0  # until a step returns, what the cache holds is unknown
        ids = self._ids
        started = time.monotonic()
        self._prefill(prompt, reuse, step, image, cancelled, last=max_new <= 1)
        if reuse == 0:
            model.costs.note_prefill(time.monotonic() - started, len(prompt))
        generated = 0
        evaluated = len(prompt)  # of ids, those the cache holds
        reason: FinishReason = "length"
        while True:
            token = step.choose()
            ids.append(token)
            generated += 1
            if model.is_end(token):
                reason = "stop"
                break
            delta = text.add(token, step.logprob)
            if delta is not None:
                yield delta
            if text.stop.stopped or step.done:  # a stop string, or the grammar's structure complete
                reason = "stop"
                break
            if generated >= max_new:
                break
            if cancelled():
                return False
            if step.forcing:  # the grammar's next token needs no logits: taken with the others in one pass
                continue
            began = time.monotonic()
            step.evaluate(ids, evaluated, extra, last=generated + 1 >= max_new)
            self._cached = len(ids) if image is None else 0  # with an image, cache positions are not the ids
            if len(ids) - evaluated == 1:
                model.costs.note_decode(time.monotonic() - began)
            evaluated = len(ids)
        yield from text.end()
        if text.tool_call:
            reason = "tool_calls"
        usage = Usage(len(prompt) + extra, generated, cached_tokens=reuse) if choice == 0 else Usage(0, generated)
        yield Finish(reason, usage, text.stop.matched, choice)
        return True

    def _decoder(self, request: ChatRequest, max_new: int, choice: int) -> Plain | Sampled:
        model = self.model
        if not model.sampled(request):
            return Plain(self.runner, model.generation_config(request, max_new), model.detokenizer)
        if self._logits is None:
            self._logits = np.empty(model.vocab_size, np.float32)
            self._bitmask = np.zeros(sampler.bitmask_words(model.vocab_size), np.int32)
        constraint = model.grammars.constraint(request) if model.grammars is not None else None
        pick = sampler.Sampler(model.sampling(request), model.vocab_size, model.real_tokens,
                               sampler.generator(request.seed, choice))
        return Sampled(self.runner, self._logits, self._bitmask, pick, constraint, model,
                       model.token_logprob if request.logprobs else None)

    def _prefill(self, prompt: list[int], reuse: int, step: Plain | Sampled, image: Any,
                 cancelled: Callable[[], bool], last: bool) -> None:
        """Evaluate what the cache lacks of ``prompt`` (the next token is then ``step.choose()``)."""
        if self.runner.batched or image is not None or (reuse == 0 and not PATCHED):
            step.evaluate(prompt, reuse, 0, image, cancelled, last)  # the stepper reads a prompt in chunks itself
        elif PATCHED:  # in pieces: a graph holds each new token's scores against every key
            rows = self.model.prefill_rows
            for start in range(reuse, len(prompt), rows):
                end = min(start + rows, len(prompt))
                step.evaluate(prompt[:end], start, 0)
                self._cached = end
        else:  # stock build: one token a call once the cache holds something
            for i in range(reuse, len(prompt)):
                step.evaluate(prompt[:i + 1], i, 0)
                self._cached = i + 1
        self._cached = len(prompt) if image is None else 0


class Plain:
    """chatglm.cpp chooses the next token itself (generate_next_token): a plain request's way, the fastest."""

    logprob = None
    done = False
    forcing = False

    def __init__(self, runner: Runner, config: Any, detokenizer: Callable[[], Detokenizer | ByteDetokenizer]) -> None:
        self._runner = runner
        self._config = config
        self.detokenizer = detokenizer
        self._token = 0

    def evaluate(self, ids: list[int], start: int, extra: int, image: Any = None,
                 cancelled: Callable[[], bool] | None = None, last: bool = False) -> None:
        """Evaluate ``ids[start:]`` (the cache holds what is before, ``extra`` positions more after an image);
        ``last``: the answer takes no token after the one chosen next."""
        self._token = self._runner.next_token(ids, start, extra, self._config, image, cancelled, last)

    def choose(self) -> int:
        return int(self._token)


class Sampled:
    """The logits come to Python (next_token_logits) and the sampler chooses, within the constraint if any."""

    def __init__(self, runner: Runner, logits: np.ndarray, bitmask: np.ndarray, pick: sampler.Sampler,
                 constraint: Constraint | None, owner: Model, describe: Callable[[sampler.Pick], TokenLogprob] | None,
                 ) -> None:
        self._runner = runner
        self._logits = logits
        self._bitmask = bitmask
        self._sampler = pick
        self.constraint = constraint
        self._owner = owner
        self._describe = describe
        self.logprob: TokenLogprob | None = None
        # Tokens the grammar forces, taken without sampling and evaluated together (not with logprobs: a forced
        # token has no distribution to report).
        self._forced: deque[int] = deque(self._forced_next() if describe is None else ())

    def detokenizer(self) -> Detokenizer | ByteDetokenizer:
        """A constrained answer's text is its tokens' bytes, exactly what the grammar allowed (a
        sentencepiece decoder would rewrite some: ChatGLM2's punctuation, ChatGLM3's special-token text)."""
        return ByteDetokenizer(self._owner.tokens) if self.constraint is not None else self._owner.detokenizer()

    def evaluate(self, ids: list[int], start: int, extra: int, image: Any = None,
                 cancelled: Callable[[], bool] | None = None, last: bool = False) -> None:
        self._runner.logits(ids, start, extra, self._logits, image, cancelled)

    def choose(self) -> int:
        constraint = self.constraint if self.constraint is not None and not self.constraint.free else None
        if self._forced and constraint is not None:
            token = self._forced.popleft()
            constraint.accept(token)
            self._sampler.accept(token)
            return token
        if constraint is not None:
            constraint.fill(self._bitmask)
        pick = self._sampler.pick(self._logits, None if constraint is None else self._bitmask)
        if constraint is not None:
            constraint.accept(pick.token)
        self._sampler.accept(pick.token)
        self.logprob = None if self._describe is None else self._describe(pick)
        if self._describe is None:
            self._forced.extend(self._forced_next())
        return pick.token

    def _forced_next(self) -> list[int]:
        return [] if self.constraint is None else self.constraint.forced()

    @property
    def forcing(self) -> bool:
        """The next token is the grammar's, not the model's: no logits needed for it."""
        return bool(self._forced)

    @property
    def done(self) -> bool:
        return self.constraint is not None and not self.constraint.free and self.constraint.done
