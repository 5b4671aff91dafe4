"""The stepper: one thread per model that evaluates every running sequence's next tokens in one forward pass
(aigate's build of chatglm.cpp, ``model.step``: the weights are read once per step, whatever the number of
sequences), each sequence in a KV slot of its own.

A generation's thread hands its sequence's next tokens over as a Job and waits for the step that evaluates
them: a token to decode, or a prompt, which goes in chunks between decode steps so that running streams keep
flowing while it is read (the chunk sized to keep a step near STEP_TARGET_SECONDS). A step waits a moment for
the sequences of the previous step to hand in their next token, so that they go together rather than in turns.

A sequence whose token chatglm.cpp just sampled is decoded one token ahead (unless that token ends the answer: an
end token, or the last one max_tokens allows): the next step evaluates that token at once, while the generation's
thread is still busy with it (its text, stop strings, the client), and hands the result over when the generation
asks for exactly that evaluation; anything else it asks drops it (the cache position it wrote is written again).
So one chat's steps follow each other without waiting for the hand-over.

Steps of every model in the process, and the single-sequence calls of a build without ``step``, take turns
through COMPUTE: on a small machine two graphs computed at once each spin their threads on the same cores and
both crawl.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import chatglm_cpp
import numpy as np

from backends.base import ClientGone

log = logging.getLogger(__name__)

T = TypeVar("T")

STEP_TARGET_SECONDS = 0.15  # a step that reads a prompt chunk beside running streams: their gap, about
SMALL_JOB = 16  # tokens (a grammar's forced run) that go whole into any step, beside the decodes
MIN_CHUNK = 32  # a prompt chunk at least: fewer would make a long prompt wait for many weight reads
GRACE_SECONDS = (0.002, 0.02)  # the wait for a sequence of the last step to hand in its next token: half a decode
# step, within these bounds (a thread's wake-up and its work on a token take a millisecond or two)


class FairLock:
    """A lock taken in the order asked for: threading.Lock lets the thread that just released it take it
    again first, which would starve the others of steps."""

    def __init__(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._queue: deque[object] = deque()
        self._held = False

    def __enter__(self) -> None:
        me = object()
        with self._cv:
            self._queue.append(me)
            while self._held or self._queue[0] is not me:
                self._cv.wait()
            self._queue.popleft()
            self._held = True

    def __exit__(self, *exc: object) -> None:
        with self._cv:
            self._held = False
            self._cv.notify_all()


COMPUTE = FairLock()  # one graph computed at a time in this process


@dataclass(eq=False)
class Job:
    """One sequence's next evaluation: ``tokens`` go into ``slot``'s cache from ``kv_pos`` (RoPE positions from
    ``rope_pos``); then the next token is sampled with ``sample`` (a GenerationConfig) or the last token's logits
    are written to ``logits``. A prompt goes in chunks: ``done`` counts the tokens already evaluated."""

    slot: int
    tokens: list[int]
    kv_pos: int
    rope_pos: int
    sample: Any = None
    logits: np.ndarray | None = None
    cancelled: Callable[[], bool] | None = None
    done: int = 0
    token: int = -1
    error: BaseException | None = None
    finished: threading.Event = field(default_factory=threading.Event)
    last: bool = False  # the answer takes no token after the one this job samples: nothing to evaluate ahead
    ahead: bool = False  # evaluated before its generation asked (and not claimed yet)
    dropped: bool = False  # an ahead job its generation did not want

    @property
    def left(self) -> int:
        return len(self.tokens) - self.done

    def end(self, error: BaseException | None = None) -> None:
        self.error = error
        self.finished.set()


@dataclass
class StepTimes:
    """Seconds per decode step and per prompt token in a chunk (moving averages), for sizing chunks."""

    decode: float = 0.0
    per_prompt_token: float = 0.0

    def note(self, seconds: float, decodes: int, chunk: int) -> None:
        if chunk == 0:
            self.decode = _average(self.decode, seconds)
        elif chunk >= SMALL_JOB:  # what the chunk cost beyond the decodes beside it
            self.per_prompt_token = _average(self.per_prompt_token,
                                             max(seconds - (self.decode if decodes else 0.0), 0.0) / chunk)


def _average(old: float, new: float) -> float:
    return new if old == 0 else 0.8 * old + 0.2 * new


class Stepper:
    """The thread that owns a batched model (``model.step``) and steps every sequence's jobs together."""

    def __init__(self, model: Any, vocab_size: int, slots: int, max_chunk: int,
                 is_end: Callable[[int], bool] = lambda token: False, name: str = "stepper") -> None:
        self._model = model
        self._is_end = is_end  # a token that ends an answer: nothing is evaluated after it
        self._max_chunk = max_chunk  # rows a prompt chunk may have at most (its attention scores' memory)
        self._out = np.empty((slots, vocab_size), np.float32)  # the logits rows of one step
        self._cv = threading.Condition()
        self._jobs: list[Job] = []  # handed in, in order, not yet finished
        self._calls: deque[tuple[Callable[[], Any], Job]] = deque()
        self._expected: set[int] = set()  # slots whose token the last step gave: their next one is near
        self._ahead: dict[int, Job] = {}  # each slot's job evaluated ahead, until its generation claims it
        self._max_length = int(model.config.max_length)
        self._closed = False
        self.times = StepTimes()
        self.steps = 0
        self.claimed_ahead = 0  # evaluations a generation found done (or under way) when it asked
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def evaluate(self, job: Job) -> int:
        """Evaluate ``job`` in the steps to come and return its next token (-1 when it asked for logits).
        Raises what the step raised (RuntimeError: chatglm.cpp refused it), ClientGone when ``job.cancelled()``
        said so between two chunks of a prompt."""
        with self._cv:
            if self._closed:
                raise RuntimeError("the model was unloaded")
            ahead = self._ahead.pop(job.slot, None)
            if ahead is not None and _same(ahead, job):
                job, ahead.ahead, ahead.last = ahead, False, job.last  # claimed: from now on the generation's own
                self.claimed_ahead += 1
                self._go_ahead(job)  # its step may be over already
            else:
                if ahead is not None:
                    ahead.dropped = True
                self._jobs.append(job)
                self._cv.notify_all()
        job.finished.wait()
        if job.error is not None:
            raise job.error
        return job.token

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the stepper's thread, between two steps (the single-sequence path: a prompt with an
        image, which a step cannot take)."""
        job = Job(-1, [], 0, 0)
        result: list[T] = []
        with self._cv:
            if self._closed:
                raise RuntimeError("the model was unloaded")
            self._calls.append((lambda: result.append(fn()), job))
            self._cv.notify_all()
        job.finished.wait()
        if job.error is not None:
            raise job.error
        return result[0]

    def leave(self, slot: int) -> None:
        """The sequence in ``slot`` hands in nothing more (its answer ended): the next step need not wait for it."""
        with self._cv:
            self._expected.discard(slot)
            ahead = self._ahead.pop(slot, None)
            if ahead is not None:
                ahead.dropped = True
            self._cv.notify_all()

    def close(self) -> None:
        """Stop the thread after the step under way; jobs still waiting fail."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._jobs or self._calls or self._closed):
                    self._cv.wait()
                if self._closed:
                    for job in self._jobs:
                        job.end(RuntimeError("the model was unloaded"))
                    for _, job in self._calls:
                        job.end(RuntimeError("the model was unloaded"))
                    return
                self._gather()
                calls, self._calls = list(self._calls), deque()
                jobs = list(self._jobs)
            for fn, job in calls:
                try:
                    with COMPUTE:
                        fn()
                except BaseException as exc:  # the caller's to handle, in its own thread
                    job.end(exc)
                else:
                    job.end()
            if jobs:
                self._step(jobs)

    def _gather(self) -> None:
        """Wait (holding the condition) a little for the sequences of the last step that have not handed in
        their next token yet: a step without them would leave them for the next."""
        deadline = time.monotonic() + min(GRACE_SECONDS[1], max(GRACE_SECONDS[0], self.times.decode / 2))
        while self._expected - {job.slot for job in self._jobs} and not self._closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cv.wait(left)

    def _step(self, jobs: list[Job]) -> None:
        taken: list[tuple[Job, int]] = []
        prompt: Job | None = None
        for job in jobs:
            if job.dropped:  # not wanted, and its slot may have the wanted job in this very step
                self._finish(job)
                continue
            if job.cancelled is not None and job.done and job.cancelled():  # between two chunks of its prompt
                self._finish(job, ClientGone("cancelled"))
                continue
            if job.left <= SMALL_JOB:
                taken.append((job, job.left))
            elif prompt is None:  # one prompt a step, the oldest first
                prompt = job
        decodes = len(taken)
        if prompt is not None:
            taken.append((prompt, min(prompt.left, self._chunk(decodes))))
        if not taken:
            return
        began = time.monotonic()
        try:
            tokens = self._compute(taken)
        except RuntimeError as exc:  # chatglm.cpp refused an entry, before any compute: the model is as it was
            if len(taken) == 1:
                log.error("a step failed: %s", exc)
                self._finish(taken[0][0], exc)
            else:  # which one? each alone, so that the others go on
                for one in taken:
                    self._step([one[0]])
            return
        self.times.note(time.monotonic() - began, decodes, 0 if prompt is None else taken[-1][1])
        self.steps += 1
        row = 0
        finished = set()
        for (job, count), token in zip(taken, tokens, strict=True):
            job.done += count
            if job.left:
                continue
            if job.logits is not None:
                np.copyto(job.logits, self._out[row])
                row += 1
            job.token = int(token)
            finished.add(job.slot)
            self._finish(job)
        with self._cv:
            self._expected = finished
            for job, _ in taken:  # a claimed job's token goes on at once (an unclaimed one waits for its claim)
                if not job.ahead:
                    self._go_ahead(job)

    def _go_ahead(self, job: Job) -> None:
        """Queue the evaluation of the token ``job`` just sampled (holding the condition), when its step is over,
        chatglm.cpp sampled it (a failed or dropped job has no token), it does not end the answer (an end token, or
        the last token max_tokens allows) and it fits in the context."""
        if (not job.finished.is_set() or job.sample is None or job.token < 0 or self._is_end(job.token)
                or job.last or job.slot in self._ahead):
            return
        kv_pos = job.kv_pos + len(job.tokens)
        if kv_pos + 1 > self._max_length:
            return
        ahead = Job(job.slot, [job.token], kv_pos, job.rope_pos + len(job.tokens), sample=job.sample, ahead=True)
        self._ahead[job.slot] = ahead
        self._jobs.append(ahead)
        self._cv.notify_all()

    def _compute(self, taken: list[tuple[Job, int]]) -> list[int]:
        """One step over ``count`` tokens of each job; the logits asked for in ``self._out``'s rows, in order."""
        entries, logits_rows = [], 0
        for job, count in taken:
            last = count == job.left
            wants_logits = last and job.logits is not None
            logits_rows += wants_logits
            entries.append(chatglm_cpp._C.StepEntry(
                job.slot, job.tokens[job.done:job.done + count], job.kv_pos + job.done, job.rope_pos + job.done,
                job.sample if last and job.logits is None else None, wants_logits))
        with COMPUTE:
            return list(self._model.step(entries, self._out if logits_rows else None))

    def _chunk(self, decodes: int) -> int:
        """Rows of the next prompt chunk: all that memory allows when no stream runs beside it, else what
        keeps the step near STEP_TARGET_SECONDS."""
        per_token = self.times.per_prompt_token
        if not decodes or per_token <= 0:
            return self._max_chunk
        rows = int((STEP_TARGET_SECONDS - self.times.decode) / per_token)
        return max(MIN_CHUNK, min(self._max_chunk, rows))

    def _finish(self, job: Job, error: BaseException | None = None) -> None:
        with self._cv:
            self._jobs.remove(job)
        job.end(error)


def _same(ahead: Job, asked: Job) -> bool:
    """Whether the generation asks exactly what was evaluated ahead."""
    return (asked.tokens == ahead.tokens and asked.kv_pos == ahead.kv_pos and asked.rope_pos == ahead.rope_pos
            and asked.sample is ahead.sample and asked.logits is None)
