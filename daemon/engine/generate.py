"""Generation: mlx-lm's own stream_generate and samplers, run over any (paged or resident) model.

The same calls serve `moed generate`, the benchmark and the daemon.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import mlx.core as mx
from mlx_lm.generate import GenerationResponse, stream_generate
from mlx_lm.sample_utils import make_sampler


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temp: float = 0.0
    top_p: float = 0.0
    seed: int | None = 0
    ignore_eos: bool = False  # benchmarks and traces: always decode max_tokens


@dataclass
class GenerationResult:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    prompt_tokens: int = 0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    ttft_s: float = 0.0
    finish_reason: str | None = None
    logprobs: mx.array | None = None  # of the last step

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("logprobs")
        return d


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux: VmHWM, the high-water mark of this process image; `ru_maxrss` survives exec, so a child
    of a large parent would report the parent's size. macOS: `ru_maxrss` (bytes there).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def encode_prompt(tokenizer, prompt: str, chat: bool = False, system: str | None = None) -> list[int] | str:
    """Raw text is left to stream_generate to tokenize; `chat` applies the chat template."""
    if not chat:
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def stream(model, tokenizer, prompt: str | list[int], params: SamplingParams) -> Iterator[GenerationResponse]:
    """mlx-lm's stream_generate with mlx-lm's sampler."""
    if params.seed is not None:
        mx.random.seed(params.seed)
    sampler = make_sampler(temp=params.temp, top_p=params.top_p)
    processors = [_ban(sorted(tokenizer.eos_token_ids))] if params.ignore_eos else None
    yield from stream_generate(model, tokenizer, prompt, max_tokens=params.max_tokens, sampler=sampler,
                               logits_processors=processors)


def _ban(token_ids: list[int]):
    """A logits processor that makes `token_ids` impossible."""
    ids = mx.array(token_ids)

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        logits[..., ids] = -mx.inf
        return logits

    return process


def run(model, tokenizer, prompt: str | list[int], params: SamplingParams, on_text=None) -> GenerationResult:
    """Generate to the end, collecting tokens, text and timings; `on_text` sees each segment."""
    result = GenerationResult()
    t0 = time.perf_counter()
    for r in stream(model, tokenizer, prompt, params):
        if not result.tokens:
            result.ttft_s = time.perf_counter() - t0
        result.tokens.append(r.token)
        result.text += r.text
        if on_text and r.text:
            on_text(r.text)
        result.prompt_tokens, result.prefill_tps = r.prompt_tokens, r.prompt_tps
        result.decode_tps, result.finish_reason, result.logprobs = r.generation_tps, r.finish_reason, r.logprobs
    return result
