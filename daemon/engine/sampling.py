"""A request's sampler and logits processors, from its Generate fields, with mlx-lm's own parts.

mlx-lm's samplers draw from MLX's one global random key, so two seeded requests in one batch would
share (and perturb) one stream. A seeded request gets its own key instead: mlx-lm's filters
(top_p, min_p, top_k), then a categorical draw with the request's key, split once per token. The
same seed gives the same tokens alone or in a batch.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors, make_sampler

from moed.ipc.messages import Generate

Sampler = Callable[[mx.array], mx.array]


class BadSampling(ValueError):
    """A sampling field the engine cannot honour; the message names the field."""


def check(g: Generate, vocab_size: int) -> None:
    """Refuse out-of-range sampling fields by name (the HTTP layer checks its own ranges first)."""
    if not (0 <= g.temperature <= 100):
        raise BadSampling(f"temperature must be in [0, 100], got {g.temperature}")
    if not (0 <= g.top_p <= 1):
        raise BadSampling(f"top_p must be in [0, 1], got {g.top_p}")
    if g.top_k < 0:
        raise BadSampling(f"top_k must be >= 0, got {g.top_k}")
    if not (0 <= g.min_p <= 1):
        raise BadSampling(f"min_p must be in [0, 1], got {g.min_p}")
    if g.repetition_penalty is not None and g.repetition_penalty <= 0:
        raise BadSampling(f"repetition_penalty must be > 0, got {g.repetition_penalty}")
    for tok, _ in g.logit_bias or ():
        if not 0 <= tok < vocab_size:
            raise BadSampling(f"logit_bias names token {tok}, outside the vocabulary (0..{vocab_size - 1})")
    if g.logprobs > 20:
        raise BadSampling(f"top_logprobs must be at most 20, got {g.logprobs}")


def make(g: Generate) -> Sampler:
    """The request's sampler: mlx-lm's, or (seeded and sampling) mlx-lm's filters and its own key."""
    if g.seed is None or g.temperature == 0:
        return make_sampler(temp=g.temperature, top_p=g.top_p, min_p=g.min_p, top_k=g.top_k)
    return SeededSampler(g.seed, g.temperature, g.top_p, g.min_p, g.top_k)


class SeededSampler:
    """mlx-lm's filter chain (as make_sampler orders it), then a categorical draw with this
    request's own key."""

    def __init__(self, seed: int, temp: float, top_p: float, min_p: float, top_k: int):
        self.key = mx.random.key(seed)
        self.inv_temp = 1.0 / temp
        self.filters = []
        if 0 < top_p < 1.0:
            self.filters.append(lambda x: apply_top_p(x, top_p))
        if min_p != 0.0:
            self.filters.append(lambda x: apply_min_p(x, min_p, 1))
        if top_k > 0:
            self.filters.append(lambda x: apply_top_k(x, top_k))

    def __call__(self, logprobs: mx.array) -> mx.array:
        for f in self.filters:
            logprobs = f(logprobs)
        self.key, sub = mx.random.split(self.key)
        return mx.random.categorical(logprobs * self.inv_temp, key=sub)


def processors(g: Generate, tokenizer) -> list:
    """mlx-lm's logits processors for the bias and penalties, then the grammar's (if any)."""
    procs = make_logits_processors(dict(g.logit_bias) if g.logit_bias else None, g.repetition_penalty, 20,
                                   g.presence_penalty, 20, g.frequency_penalty, 20)
    if g.grammar is not None:
        from moed.daemon.engine.grammar import GrammarError, make_processor

        try:
            procs.append(make_processor(g.grammar, tokenizer))
        except GrammarError as e:  # grammar.py raises its own, so it need not import this module
            raise BadSampling(str(e)) from None
    return procs


def top_logprobs(logprobs: mx.array, n: int) -> list[tuple[int, float]]:
    """The n most likely tokens of one step and their logprobs, best first."""
    idx = mx.argpartition(-logprobs, kth=n - 1)[:n]
    vals = logprobs[idx]
    order = mx.argsort(-vals)
    return list(zip(idx[order].tolist(), vals[order].tolist()))
