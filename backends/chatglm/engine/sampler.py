"""The next token from a step's logits, chosen in Python (aigate's build hands them over: next_token_logits):
what chatglm.cpp's own sampler cannot do, a grammar's mask, logprobs, a seed, logit_bias and OpenAI's
presence and frequency penalties.

The order is the usual logits processors': padding ids out, penalties (over the generated ids only),
logit_bias, the grammar's mask; logprobs are read there, before temperature and top_p, so that the
greedy token is always the top one; then argmax (temperature 0) or temperature, top_p and a draw from
the answer's own generator (seeded: the same request gives the same answer).

Each step must stay cheap next to a forward pass (~13 ms on the bench model): greedy without logprobs
takes the unmasked argmax when the mask allows it and applies the mask only when it does not.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

TOP_P_CANDIDATES = 64  # top_p ranks the most likely few first, the whole vocabulary only if they fall short


@dataclass(frozen=True)
class Params:
    temperature: float  # 0: greedy
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass(frozen=True)
class Pick:
    token: int
    logprob: float = 0.0  # the token's log probability (when logprobs were asked)
    top: tuple[tuple[int, float], ...] = ()  # the most likely ids and their log probabilities, best first


def generator(seed: int | None, choice: int) -> np.random.Generator:
    """The draws of one answer: a seed's own stream for each choice, or fresh entropy."""
    if seed is None:
        return np.random.default_rng()
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed & (2**64 - 1), choice])))


def bitmask_words(vocab: int) -> int:
    return (vocab + 31) // 32


def allowed(bitmask: np.ndarray, token: int) -> bool:
    return bool((int(bitmask[token >> 5]) >> (token & 31)) & 1)


class Sampler:
    """One answer's sampler: ``pick`` a token from each step's logits (modified in place), then
    ``accept`` it (the penalties count the generated ids)."""

    def __init__(self, params: Params, vocab: int, real: int, rng: np.random.Generator) -> None:
        self.params = params
        self.vocab = vocab
        self.real = real  # ids from here on are padding: never chosen
        self.rng = rng
        self.counts: Counter[int] = Counter()
        self._bias_ids = np.array([i for i, _ in params.logit_bias], np.intp)
        self._bias = np.array([b for _, b in params.logit_bias], np.float32)
        self._penalised = bool(params.presence_penalty or params.frequency_penalty)

    def accept(self, token: int) -> None:
        if self._penalised:
            self.counts[token] += 1

    def pick(self, logits: np.ndarray, bitmask: np.ndarray | None = None) -> Pick:
        """The next token; ``bitmask``: bit (i % 32) of word i // 32 set when id i is allowed."""
        p = self.params
        logits[self.real:] = -np.inf
        if self.counts:
            ids = np.fromiter(self.counts.keys(), np.intp, len(self.counts))
            seen = np.fromiter(self.counts.values(), np.float32, len(self.counts))
            logits[ids] -= seen * p.frequency_penalty + p.presence_penalty
        if len(self._bias_ids):
            logits[self._bias_ids] += self._bias
        greedy = p.temperature <= 0
        if greedy and not p.logprobs:  # the fast path: most steps a grammar allows the model's own choice
            token = int(np.argmax(logits))
            if bitmask is None or allowed(bitmask, token):
                return Pick(token)
        if bitmask is not None:
            mask(logits, bitmask)
        token = int(np.argmax(logits)) if greedy else self._draw(logits)
        if not p.logprobs:
            return Pick(token)
        return self._with_logprobs(logits, token)

    def _with_logprobs(self, logits: np.ndarray, token: int) -> Pick:
        high = float(logits.max())
        total = high + float(np.log(np.exp(logits - high).sum(dtype=np.float64)))
        best = top_ids(logits, self.params.top_logprobs)
        top = tuple((int(i), float(logits[i]) - total) for i in best if np.isfinite(logits[i]))
        return Pick(token, float(logits[token]) - total, top)

    def _draw(self, logits: np.ndarray) -> int:
        p = self.params
        weights = np.exp((logits - logits.max()) / p.temperature, dtype=np.float64)
        if p.top_p < 1.0:  # the most likely ids until they hold top_p of the mass (the one that reaches it too)
            wanted = p.top_p * weights.sum()
            ranked = weights[top_ids(weights, TOP_P_CANDIDATES)]
            if ranked.sum() < wanted:  # a flat distribution: all of it, sorted (values only: cheaper)
                ranked = np.sort(weights)[::-1]
            cumulative = np.cumsum(ranked)
            threshold = ranked[min(int(np.searchsorted(cumulative, wanted)), len(ranked) - 1)]
            weights[weights < threshold] = 0.0
        cumulative = np.cumsum(weights)
        return int(min(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right"),
                       self.vocab - 1))


ROW = 64


def top_ids(values: np.ndarray, k: int) -> np.ndarray:
    """The ids of the ``k`` largest values, largest first (of equal ones, the lower id first). Cheaper than
    an argpartition of the whole vocabulary: the k largest lie in the k rows of ROW ids whose maxima are
    largest, and only those rows are ranked."""
    k = min(k, len(values))
    if k <= 0:
        return np.zeros(0, np.intp)
    rows = len(values) // ROW
    if rows <= k:
        candidates = np.arange(len(values))
    else:
        best_rows = np.sort(np.argpartition(values[:rows * ROW].reshape(rows, ROW).max(axis=1), -k)[-k:])
        candidates = np.concatenate([(best_rows[:, None] * ROW + np.arange(ROW)).ravel(),
                                     np.arange(rows * ROW, len(values))])
    return candidates[np.argsort(-values[candidates], kind="stable")[:k]]


def mask(logits: np.ndarray, bitmask: np.ndarray) -> None:
    """-inf where the bitmask does not allow the id."""
    bits = np.unpackbits(bitmask.view(np.uint8), count=len(logits), bitorder="little")
    np.copyto(logits, -np.inf, where=bits == 0)
