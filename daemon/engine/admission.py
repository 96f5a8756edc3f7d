"""Memory admission: a request runs only if its KV cache and its prefill's activations fit what is left.

The budget is the memory left for running requests once the model is loaded (`--kv-budget-gb`, else
what is available then, less the prompt cache's bound and the runtime: supervisor.new_core). A
request needs, for its whole life, its KV cache at prompt + max_tokens (rounded up to mlx-lm's
256-token allocation step) and, until its prompt is prefilled, one prefill chunk's activations at
its prompt's length. mlx-lm's batched KV cache (BatchKVCache.extend) pads every sequence of the
batch to the longest one's length, so the running requests hold n x the longest one's KV, not the
sum of theirs. One that does not fit waits until running ones finish; one that could not fit even
alone is rejected with the figures. Figures come from the model's config, as `moed plan`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from moed.daemon.engine.budget import mb

KV_STEP = 256  # mlx_lm.models.cache.KVCache grows its buffers by this many tokens


def _text(config: dict) -> dict:
    return config.get("text_config", config)


def _attention(cfg: dict) -> tuple[int, int, int]:
    """(query heads, kv heads, head dim) of a text config."""
    heads = cfg.get("num_attention_heads", 1)
    return heads, cfg.get("num_key_value_heads") or heads, cfg.get("head_dim") or cfg["hidden_size"] // heads


def kv_bytes_per_token(config: dict, attn_layers: int, dtype_bytes: int) -> int:
    """KV bytes one token takes: attention layers x 2 (K and V) x kv heads x head dim x dtype bytes
    (a hybrid model's other layers keep a fixed-size state: pass only the layers with a KVCache)."""
    _, kv_heads, head_dim = _attention(_text(config))
    return attn_layers * 2 * kv_heads * head_dim * dtype_bytes


def prefill_bytes(config: dict, chunk: int, act_bytes: int) -> tuple[int, int]:
    """One prefill chunk's activations of one prompt (one layer's at a time), as (fixed bytes, bytes
    per token of context): twice the hidden states and residuals, q/k/v/o and the MLP's (top-k
    experts' and a shared expert's) intermediates; and 1.5x the attention scores, chunk x heads per
    token attended. Measured on tiny qwen3_moe (MLX CPU, 512-token chunk): a chunk's peak over its
    KV was 17.9 MB at 1k tokens and 45.1 MB at 4k, where this counts 22.6 and 60."""
    cfg = _text(config)
    hidden = cfg["hidden_size"]
    heads, kv_heads, head_dim = _attention(cfg)
    k = cfg.get("num_experts_per_tok") or cfg.get("moe_topk") or 1
    moe = (cfg.get("moe_intermediate_size") or cfg.get("intermediate_size") or hidden) * k
    mlp = max(moe + (cfg.get("shared_expert_intermediate_size") or 0), cfg.get("intermediate_size") or 0)
    fixed = 2 * chunk * (4 * hidden + 2 * (heads + kv_heads) * head_dim + 3 * mlp) * act_bytes
    return fixed, 3 * chunk * heads * act_bytes // 2


def _kv_tokens(n: int) -> int:
    return -(-n // KV_STEP) * KV_STEP


@dataclass
class Reservation:
    kv: int
    prefill: int  # dropped once the prompt is prefilled


class Admission:
    """What the running requests hold of the budget (bytes). Not thread-safe: the engine loop's.

    `prefill_bytes` (+ `score_bytes_per_token` x prompt tokens): one chunk's activations, reserved
    per request until `prefilled`, since mlx-lm prefills up to max_batch prompts together."""

    def __init__(self, budget_bytes: int, kv_bytes_per_token: int, prefill_bytes: int,
                 score_bytes_per_token: int = 0):
        self.budget = budget_bytes
        self.kv_per_token, self.prefill, self.score_per_token = kv_bytes_per_token, prefill_bytes, score_bytes_per_token
        self.held: dict[str, Reservation] = {}

    @classmethod
    def for_model(cls, config: dict, attn_layers: int, budget_bytes: int, prefill_chunk: int,
                  dtype_bytes: int) -> Admission:
        fixed, per_token = prefill_bytes(config, prefill_chunk, dtype_bytes)
        return cls(budget_bytes, kv_bytes_per_token(config, attn_layers, dtype_bytes), fixed, per_token)

    @classmethod
    def for_loaded(cls, pm, prefill_chunk: int, budget_gb: float | None, prompt_cache_bytes: int,
                   workers: int) -> Admission:
        """For a loaded PagedModel: `budget_gb` (--kv-budget-gb), else the memory available now less the
        prompt cache's bound and the runtime's (with MOED_RAM_GB, the memory before load: less the
        model as loaded too, as load_paged's check counts it)."""
        import os

        import mlx.core as mx
        from mlx.utils import tree_flatten
        from mlx_lm.models.cache import KVCache, make_prompt_cache

        from moed.daemon.engine.budget import RUNTIME_BYTES, available_bytes, need_bytes

        if budget_gb is not None:
            budget = int(budget_gb * 1e9)
        elif os.environ.get("MOED_RAM_GB"):
            budget = available_bytes() - need_bytes(pm.non_expert_bytes, pm.info["cache_bytes"], 0, workers)
            budget -= prompt_cache_bytes
        else:
            budget = available_bytes() - prompt_cache_bytes - RUNTIME_BYTES
        attn_layers = sum(isinstance(c, KVCache) for c in make_prompt_cache(pm.model))
        dtype_bytes = next((v.dtype.size for _, v in tree_flatten(pm.model.parameters())
                            if mx.issubdtype(v.dtype, mx.floating)), 4)  # activations (so KV) as the weights
        return cls.for_model(pm.config, attn_layers, max(0, budget), prefill_chunk, dtype_bytes)

    def need(self, prompt_tokens: int, max_tokens: int) -> Reservation:
        return Reservation(self.kv_per_token * _kv_tokens(prompt_tokens + max_tokens),
                           self.prefill + self.score_per_token * prompt_tokens)

    @staticmethod
    def _total(held: list[Reservation]) -> int:
        """What `held` take together: each sequence's KV padded to the longest one's, and the prefills."""
        return len(held) * max((r.kv for r in held), default=0) + sum(r.prefill for r in held)

    @property
    def reserved(self) -> int:
        return self._total(list(self.held.values()))

    def fits(self, prompt_tokens: int, max_tokens: int) -> bool:
        """Whether the request fits beside the running ones now (all padded to the longest)."""
        return self._total([*self.held.values(), self.need(prompt_tokens, max_tokens)]) <= self.budget

    def never_fits(self, prompt_tokens: int, max_tokens: int) -> str | None:
        """Why the request could not run even alone (the rejection's message), or None."""
        r = self.need(prompt_tokens, max_tokens)
        if r.kv + r.prefill <= self.budget:
            return None
        return (f"prompt of {prompt_tokens} tokens + max_tokens {max_tokens} needs {mb(r.kv + r.prefill)} "
                f"(KV cache {mb(r.kv)}, prefill {mb(r.prefill)}) but the memory budget for requests is "
                f"{mb(self.budget)} (--kv-budget-gb); use a shorter prompt or smaller max_tokens")

    def reserve(self, req_id: str, prompt_tokens: int, max_tokens: int) -> None:
        self.held[req_id] = self.need(prompt_tokens, max_tokens)

    def prefilled(self, req_id: str) -> None:
        """Its prompt is prefilled (first token out): its activations are freed, its KV stays."""
        if (r := self.held.get(req_id)) is not None:
            r.prefill = 0

    def release(self, req_id: str) -> None:
        self.held.pop(req_id, None)

    def clear(self) -> None:
        self.held.clear()

    def status(self) -> dict:
        return {"budget_bytes": self.budget, "reserved_bytes": self.reserved, "requests": len(self.held)}
