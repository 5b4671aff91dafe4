"""Many sequences on one model (aigate's build: model.step, the stepper): greedy answers are the same batched as
alone, and what a generation does (stop strings, forced tool calls, seeds, images, cancellation, a refused step)
keeps working while others run beside it; a build without batching takes turns instead of collapsing."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from backends.base import ChatRequest, Event, Finish, ImageInput, Message, TextDelta, Tool, ToolCall
from backends.chatglm.demo_model import write_demo_model
from backends.chatglm.engine import model as engine_model
from backends.chatglm.engine import runners, stepper
from backends.chatglm.engine.model import Model
from backends.chatglm.ggml_file import read_model_file

batched = pytest.mark.skipif(not runners.BATCHED, reason="chatglm-cpp without model.step (aigate's build, +aigate.3)")

PROMPTS = ["Tell me about the river", "北京是中国的首都", "one two three four five", "What is the weather like"]
WEATHER = Tool("get_weather", "the weather", {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 10}, "days": {"type": "integer", "minimum": 1, "maximum": 14}},
    "required": ["city", "days"], "additionalProperties": False}, strict=True)


def request(content: str, **fields) -> ChatRequest:
    fields.setdefault("temperature", 0)
    fields.setdefault("max_tokens", 40)
    return ChatRequest(model="demo", messages=(Message("user", content),), **fields)


def run(model: Model, slot: int, req: ChatRequest, cancelled: Callable[[], bool] = lambda: False) -> list[Event]:
    model.check(req)
    return list(model.slots[slot].generate(req, model.prompt_ids(req), cancelled))


def text(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def together(model: Model, jobs: list[tuple[ChatRequest, Callable[[], bool]]]) -> list[list[Event]]:
    """Each request on a slot of its own, all started at once (a barrier), their events when all are done."""
    results: list[list[Event]] = [[] for _ in jobs]
    start = threading.Barrier(len(jobs))

    def go(i: int) -> None:
        start.wait()
        results[i] = run(model, i, *jobs[i])
    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.fixture(scope="module", params=["demo_model", "glm4_model", "chatglm2_model"])
def model(request) -> Model:
    loaded = Model(read_model_file(request.getfixturevalue(request.param)), 1024, slots=4)
    yield loaded
    loaded.close()


@batched
def test_greedy_answers_batched_are_the_answers_alone(model):
    alone = [text(run(model, 0, request(p))) for p in PROMPTS]
    steps = model.stepper.steps
    batch = together(model, [(request(p), lambda: False) for p in PROMPTS])
    assert [text(events) for events in batch] == alone
    tokens = sum(f.usage.completion_tokens for events in batch for f in events if isinstance(f, Finish))
    assert model.stepper.steps - steps < 0.75 * tokens  # steps were shared: four sequences, far fewer steps


@batched
def test_one_chat_decodes_a_token_ahead_and_a_stop_drops_it(model):
    # The stepper evaluates each sampled token before the generation asks for it: a greedy answer alone takes it
    # for every token after the first, and nothing is evaluated after an end token or max_tokens' last token (an
    # answer that ends so costs no step of waste); a stop string ends the answer early and the evaluation ahead is
    # dropped (its cache position is written again): the next answer on that slot is the one it would have been.
    answer = request(PROMPTS[0])
    claimed, steps = model.stepper.claimed_ahead, model.stepper.steps
    first = run(model, 0, answer)
    finish = next(f for f in first if isinstance(f, Finish))
    tokens = finish.usage.completion_tokens
    assert tokens > 3
    assert model.stepper.claimed_ahead - claimed >= tokens - 2
    if finish.reason == "stop":  # its end token: one step for the prompt and each token after the first
        assert model.stepper.steps - steps == tokens
    steps = model.stepper.steps  # nor after the last token max_tokens allows
    cut = [f for f in run(model, 0, request(PROMPTS[0], max_tokens=tokens - 1)) if isinstance(f, Finish)]
    assert [f.reason for f in cut] == ["length"] and model.stepper.steps - steps == tokens - 1
    stop = text(first)[4:7]
    assert text(run(model, 0, request(PROMPTS[0], stop=[stop]))) == text(first)[:text(first).index(stop)]
    assert text(run(model, 0, request(PROMPTS[1]))) == text(run(model, 1, request(PROMPTS[1])))


@batched
def test_stop_strings_and_cancellation_under_batching(model):
    alone = [text(run(model, 0, request(p))) for p in PROMPTS]
    stop = alone[0][5:8]
    tokens = {"n": 0}

    def cancel_after_a_few() -> bool:  # the third client leaves after its fifth token
        tokens["n"] += 1
        return tokens["n"] > 5
    batch = together(model, [(request(PROMPTS[0], stop=[stop]), lambda: False), (request(PROMPTS[1]), lambda: False),
                             (request(PROMPTS[2]), cancel_after_a_few), (request(PROMPTS[3]), lambda: False)])
    assert text(batch[0]) == alone[0][:alone[0].index(stop)]
    assert [f.reason for f in batch[0] if isinstance(f, Finish)] == ["stop"]
    assert not any(isinstance(e, Finish) for e in batch[2]) and alone[2].startswith(text(batch[2]))
    assert [text(batch[1]), text(batch[3])] == [alone[1], alone[3]]
    assert text(run(model, 2, request(PROMPTS[2]))) == alone[2]  # the cancelled slot serves the next one


@batched
def test_forced_tool_calls_and_seeded_samples_beside_plain_answers(demo_model):
    model = Model(read_model_file(demo_model), 1024, slots=3)
    try:
        forced = request(PROMPTS[0], tools=(WEATHER,), tool_choice="required", max_tokens=80)
        seeded = request(PROMPTS[1], temperature=0.9, seed=7, logprobs=True, top_logprobs=2)
        alone = [run(model, 0, r) for r in (forced, seeded, request(PROMPTS[2]))]
        batch = together(model, [(r, lambda: False) for r in (forced, seeded, request(PROMPTS[2]))])
        call = next(e for e in batch[0] if isinstance(e, ToolCall))
        assert call.name == "get_weather" and set(json.loads(call.arguments)) == {"city", "days"}
        assert [text(e) for e in batch] == [text(e) for e in alone]
        # the logits of a batched step may differ from alone in their last bits (the current ggml picks another
        # matrix kernel for several rows, and the difference carries on through the cache): the same tokens, the
        # same logprobs to 1e-2 (measured: 4e-4 at most)
        got, want = ([lp for e in events if isinstance(e, TextDelta) for lp in e.logprobs or ()]
                     for events in (batch[1], alone[1]))
        assert got and [t.token for t in got] == [t.token for t in want]
        assert max(abs(a.logprob - b.logprob) for a, b in zip(got, want, strict=True)) < 1e-2
    finally:
        model.close()


@batched
def test_a_prompt_joins_in_chunks_while_others_decode(chatglm2_model, monkeypatch):
    """A long prompt goes in chunks between the steps of a running stream (the same chunks as alone: a prompt
    evaluated in other pieces may differ in the logits' last bits), and both answers are as alone."""
    beside: list[int] = []  # how many decoding sequences each chunk's step had beside it

    def chunk(self: stepper.Stepper, decodes: int) -> int:
        beside.append(decodes)
        return 64
    monkeypatch.setattr(stepper.Stepper, "_chunk", chunk)
    model = Model(read_model_file(chatglm2_model), 1024, slots=2)  # a model that never ends an answer itself
    try:
        long_prompt = " ".join(f"word{i}" for i in range(120))
        running, joiner = request(PROMPTS[0], max_tokens=150), request(long_prompt, max_tokens=10)
        alone = [text(run(model, 0, r)) for r in (running, joiner)]
        results: list[str] = []
        joiner_thread = threading.Thread(target=lambda: results.append(text(run(model, 1, joiner))))
        tokens = {"n": 0}

        def join_later() -> bool:  # called between the running stream's tokens: the joiner starts at its 10th
            tokens["n"] += 1
            if tokens["n"] == 10:
                beside.clear()
                joiner_thread.start()
            return False
        first = text(run(model, 0, running, join_later))
        joiner_thread.join()
        assert [first, results[0]] == alone
        chunks = -(-len(model.prompt_ids(joiner)) // 64)
        assert chunks >= 4 and len(beside) >= chunks - 1 and set(beside) == {1}  # the stream stepped beside each
    finally:
        model.close()


@batched
def test_a_refused_step_fails_only_its_own_sequence(demo_model):
    """A job chatglm.cpp refuses (a token id past the vocabulary; it checks before computing) in the same step as
    a good one: the bad one fails, the good one's answer is as alone."""
    model = Model(read_model_file(demo_model), 1024, slots=2)
    try:
        alone = text(run(model, 0, request(PROMPTS[0], max_tokens=60)))
        inside, gate = threading.Event(), threading.Event()

        def hold() -> None:  # the stepper's thread waits here while both jobs are handed in
            inside.set()
            gate.wait()
        holder = threading.Thread(target=lambda: model.stepper.call(hold))
        holder.start()
        inside.wait()
        errors: list[BaseException] = []
        got: list[str] = []

        def bad() -> None:
            try:
                model.stepper.evaluate(stepper.Job(1, [model.vocab_size + 5], 0, 0,
                                                   sample=model.generation_config(request("x"), 1)))
            except RuntimeError as exc:
                errors.append(exc)
        threads = [threading.Thread(target=bad),
                   threading.Thread(target=lambda: got.append(text(run(model, 0, request(PROMPTS[0], max_tokens=60)))))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(model.stepper._jobs) < 2 and time.monotonic() < deadline:  # both handed in, none stepped yet
            time.sleep(0.005)
        assert len(model.stepper._jobs) == 2
        gate.set()
        for t in [holder, *threads]:
            t.join()
        assert got == [alone] and errors and "vocabulary" in str(errors[0])
    finally:
        model.close()


@batched
def test_an_image_request_beside_a_text_one(glm4v_model):
    model = Model(read_model_file(glm4v_model), 1024, slots=2)
    try:
        size = model.file.vision.image_size
        pixels = bytes(i % 251 for i in range(size * size * 3))
        image = ImageInput(base64.b64encode(pixels).decode(), size, size)
        seeing = ChatRequest(model="demo", messages=(Message("user", "What is this?", images=(image,)),),
                             temperature=0, max_tokens=30)
        plain = request(PROMPTS[1])
        alone = [text(run(model, 0, r)) for r in (seeing, plain)]
        batch = together(model, [(seeing, lambda: False), (plain, lambda: False)])
        assert [text(e) for e in batch] == alone
    finally:
        model.close()


def test_without_batching_slots_take_turns(chatglm2_model, monkeypatch):
    """A build without model.step (a stock chatglm-cpp): a Pipeline per slot, whose calls take turns
    (COMPUTE), so two answers at once take about as long as one after the other, not many times more."""
    monkeypatch.setattr(engine_model, "BATCHED", False)
    model = Model(read_model_file(chatglm2_model), 1024, slots=2)
    assert model.stepper is None
    reqs = [request(PROMPTS[0], max_tokens=60), request(PROMPTS[1], max_tokens=60)]
    started = time.monotonic()
    alone = [text(run(model, 0, r)) for r in reqs]
    one_after_the_other = time.monotonic() - started
    started = time.monotonic()
    batch = together(model, [(r, lambda: False) for r in reqs])
    at_once = time.monotonic() - started
    assert [text(e) for e in batch] == alone
    assert at_once < 2 * one_after_the_other


@batched
def test_long_prompt_chunks_attend_by_flash_attention_with_the_same_answers(chatglm2_model, monkeypatch):
    """A prompt chunk of 64 tokens or more attends by ggml's flash attention (F32 tiles; shorter ones and decode
    by mul_mat and soft_max over F16, which CHATGLM_FLASH_ATTN=0 keeps for every chunk): the same greedy answer,
    the same logprobs to 1e-2 (measured: 1e-3 at most), not the same bits (it did take the other path)."""
    model = Model(read_model_file(chatglm2_model), 1024, slots=2)
    try:
        long_prompt = request(" ".join(f"word{i}" for i in range(120)), max_tokens=12, logprobs=True)
        flash = run(model, 0, long_prompt)
        monkeypatch.setenv("CHATGLM_FLASH_ATTN", "0")  # read at each step
        plain = run(model, 1, long_prompt)  # another slot: slot 0 would answer the prompt from its cache
        assert text(flash) == text(plain) and text(flash)
        got, want = ([lp.logprob for e in events if isinstance(e, TextDelta) for lp in e.logprobs or ()]
                     for events in (flash, plain))
        differences = [abs(a - b) for a, b in zip(got, want, strict=True)]
        assert 0 < max(differences) < 1e-2
    finally:
        model.close()


@batched
def test_what_an_earlier_sequence_left_in_a_slot_never_reaches_an_answer(demo_model):
    """Decode and short chunks attend over the cache up to the next multiple of 16 positions (aigate's build from
    +aigate.9: that is when ggml's tiled GEMM takes the attention products), so the positions past a sequence,
    which hold what the slot's earlier, longer sequence left there, must not count: the same tokens give the same
    logits, to the bit, in that slot as in a fresh one."""
    model = Model(read_model_file(demo_model), 1024, slots=2)
    try:
        runners = [slot.runner for slot in model.slots]
        runners[0].logits([10 + i % 500 for i in range(300)], 0, 0, np.empty(model.vocab_size, np.float32))
        ids = [20 + i % 300 for i in range(41)]  # 41 and 42 positions: neither a multiple of 16
        logits = [[np.empty(model.vocab_size, np.float32) for _ in range(2)] for _ in runners]
        for runner, (prompt, decode) in zip(runners, logits, strict=True):
            runner.logits(ids[:-1], 0, 0, prompt)  # one chunk of 40, from position 0
            runner.logits(ids, 40, 0, decode)  # one decode step
        assert all(np.isfinite(x).all() for pair in logits for x in pair)
        assert np.array_equal(logits[0][0], logits[1][0]) and np.array_equal(logits[0][1], logits[1][1])
    finally:
        model.close()


@batched
def test_q4_0_answers_batched_as_alone_and_as_ggmls_plain_kernels(models_dir, monkeypatch):
    """aigate's build repacks q4_0 matrices at load and, on AVX512-VNNI, multiplies them with its own kernels (a GEMV
    for one row, a GEMM four rows at a time: a prompt's, or four sequences' tokens). The same greedy answers batched
    as alone and as with ggml's plain q4_0 dot products (CHATGLM_REPACK=0), logprobs to 0.1: the integer sums are
    the same, the float ones differ in their last bits, which now and then rounds a value of the next layer's
    quantized input the other way (measured: 0.015 batched, 0.035 plain; with ggml's kernels 0.036 and 0.046)."""
    path = write_demo_model(models_dir / "q4_0.bin", dtype="q4_0", hidden_size=256, ffn_size=768, eos_every=0,
                            max_length=1024)
    prompts = [request(p, max_tokens=10, logprobs=True)
               for p in [*PROMPTS, " ".join(f"word{i}" for i in range(60))]]

    def answers(batch: bool) -> list[list[Event]]:
        model = Model(read_model_file(path), 1024, slots=5)
        try:
            if batch:
                return together(model, [(r, lambda: False) for r in prompts])
            return [run(model, 0, r) for r in prompts]
        finally:
            model.close()

    def logprobs(events: list[Event]) -> list[float]:
        return [lp.logprob for e in events if isinstance(e, TextDelta) for lp in e.logprobs or ()]

    def largest_difference(got: list[list[Event]], want: list[list[Event]]) -> float:
        assert [text(e) for e in got] == [text(e) for e in want]
        return max(abs(a - b) for g, w in zip(got, want, strict=True)
                   for a, b in zip(logprobs(g), logprobs(w), strict=True))

    alone = answers(batch=False)
    assert all(len(logprobs(e)) == 10 for e in alone)
    assert largest_difference(answers(batch=True), alone) < 0.1
    monkeypatch.setenv("CHATGLM_REPACK", "0")  # read at load
    assert largest_difference(answers(batch=False), alone) < 0.1
