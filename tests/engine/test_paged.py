"""The paged engine equals mlx-lm with the whole model resident, token for token."""

import mlx.core as mx
import numpy as np
import pytest

from moed.daemon.engine.generate import SamplingParams, run
from moed.daemon.engine.loader import load_paged, load_resident

PROMPTS = [
    "The paged expert cache",
    "Once upon a time, in a land of small memories and large models,",
    "def fetch(layer, expert):",
]
MAX_TOKENS = 48
ARCHS = ["qwen3_moe", "qwen3_5_moe", "mixtral"]


@pytest.fixture(scope="module")
def references(tiny_models):
    """mlx-lm's greedy tokens and last logprobs per (arch, prompt), resident."""
    out = {}
    for arch in ARCHS:
        model, tok = load_resident(tiny_models[arch])
        for p in PROMPTS:
            r = run(model, tok, p, SamplingParams(max_tokens=MAX_TOKENS))
            out[arch, p] = (r.tokens, np.array(r.logprobs))
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cache", ["min", 0.5, 1.0])
def test_greedy_tokens_and_logits_equal_mlx_lm(arch, cache, tiny_models, references):
    fraction = 1e-9 if cache == "min" else cache  # clamped up to top-k slots per layer
    with load_paged(tiny_models[arch], cache_fraction=fraction, workers=2) as pm:
        if cache == "min":
            assert pm.info["slots_per_layer"] == [pm.top_k] * pm.info["moe_layers"]
        for p in PROMPTS:
            r = run(pm.model, pm.tokenizer, p, SamplingParams(max_tokens=MAX_TOKENS))
            tokens, logprobs = references[arch, p]
            assert r.tokens == tokens, f"{arch} cache={cache} prompt={p!r}"
            assert len(r.tokens) == MAX_TOKENS
            np.testing.assert_allclose(np.array(r.logprobs), logprobs, atol=1e-5, rtol=0)
        st = pm.store.stats
        if cache == 1.0:  # warmed at load: every expert resident, nothing read while serving
            assert st.misses == 0 and st.bytes_read == 0 and pm.info["warm_bytes"] == pm.expert_bytes
        else:
            assert st.misses > 0 and st.bytes_read > 0
        if cache == "min":
            assert pm.store.evictions() > 0, "a top-k cache must evict"


def test_unwarmed_cache_fills_on_demand(tiny_models, references):
    with load_paged(tiny_models["qwen3_5_moe"], cache_fraction=1.0, warm=False) as pm:
        r = run(pm.model, pm.tokenizer, PROMPTS[0], SamplingParams(max_tokens=MAX_TOKENS))
        assert r.tokens == references["qwen3_5_moe", PROMPTS[0]][0]
        assert pm.info["warm_bytes"] == 0 and pm.store.stats.misses > 0 and pm.store.evictions() == 0


def test_sampled_tokens_equal_mlx_lm(tiny_models):
    """Random sampling with a fixed seed draws the same tokens as mlx-lm."""
    params = SamplingParams(max_tokens=32, temp=1.0, seed=7)
    model, tok = load_resident(tiny_models["qwen3_moe"])
    ref = run(model, tok, PROMPTS[1], params)
    with load_paged(tiny_models["qwen3_moe"], cache_fraction=0.25) as pm:
        assert run(pm.model, pm.tokenizer, PROMPTS[1], params).tokens == ref.tokens


def test_bf16_checkpoint_cast_to_float32(tiny_model):
    """--dtype float32 on a bf16 checkpoint equals mlx-lm given the same cast."""
    path = tiny_model("qwen3_moe", dtype="bfloat16")
    model, tok = load_resident(path, dtype="float32")
    ref = run(model, tok, PROMPTS[0], SamplingParams(max_tokens=24))
    with load_paged(path, cache_fraction=0.25, dtype="float32") as pm:
        pools = [p.array.dtype for pools in pm.store.pools for p in pools]
        assert mx.float32 in pools and mx.bfloat16 not in pools
        r = run(pm.model, pm.tokenizer, PROMPTS[0], SamplingParams(max_tokens=24))
    assert r.tokens == ref.tokens
    np.testing.assert_allclose(np.array(r.logprobs), np.array(ref.logprobs), atol=1e-5, rtol=0)


def test_bf16_checkpoint_uncast(tiny_model):
    """Without a cast, bf16 experts page in as bf16 and still match mlx-lm."""
    path = tiny_model("qwen3_moe", dtype="bfloat16")
    model, tok = load_resident(path)
    ref = run(model, tok, PROMPTS[2], SamplingParams(max_tokens=16))
    with load_paged(path, cache_fraction=0.25) as pm:
        assert any(p.array.dtype == mx.bfloat16 for pools in pm.store.pools for p in pools)
        assert run(pm.model, pm.tokenizer, PROMPTS[2], SamplingParams(max_tokens=16)).tokens == ref.tokens


def test_cache_budget_by_gb(tiny_models):
    with load_paged(tiny_models["mixtral"], cache_gb=1e-9) as pm:  # clamps to top-k
        assert pm.info["slots_per_layer"][0] == pm.top_k
    with load_paged(tiny_models["mixtral"], cache_gb=100) as pm:  # clamps to all experts
        assert pm.info["slots_per_layer"] == pm.info["experts_per_layer"]
    with pytest.raises(ValueError, match="cache-fraction"):
        load_paged(tiny_models["mixtral"], cache_fraction=1.5)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_5_moe"])
def test_top_k_override_matches_mlx_lm_with_the_same_override(arch, tiny_models):
    model, tok = load_resident(tiny_models[arch], top_k=2)
    ref = run(model, tok, PROMPTS[1], SamplingParams(max_tokens=24))
    full = run(*load_resident(tiny_models[arch]), PROMPTS[1], SamplingParams(max_tokens=24))
    with load_paged(tiny_models[arch], cache_fraction=0.25, top_k=2) as pm:
        r = run(pm.model, pm.tokenizer, PROMPTS[1], SamplingParams(max_tokens=24))
    assert r.tokens == ref.tokens and r.tokens != full.tokens


@pytest.mark.parametrize("arch", ARCHS)
def test_lookahead_is_exact_and_predicts(arch, tiny_models, references):
    """Reading the next layer's predicted experts early changes what is cached, never the output."""
    hit_rates = {}
    for ahead in (False, True):
        with load_paged(tiny_models[arch], cache_fraction=0.25, workers=2, lookahead=ahead) as pm:
            for p in PROMPTS:
                r = run(pm.model, pm.tokenizer, p, SamplingParams(max_tokens=MAX_TOKENS))
                tokens, logprobs = references[arch, p]
                assert r.tokens == tokens
                np.testing.assert_allclose(np.array(r.logprobs), logprobs, atol=1e-5)
            st = pm.store.stats
            hit_rates[ahead] = st.hit_rate
            if ahead:
                chance = pm.top_k / pm.info["experts_per_layer"][0]
                assert st.prefetched > 0 and st.prefetch_used / st.prefetched > 2 * chance
            else:
                assert st.prefetched == 0
    assert hit_rates[True] > hit_rates[False]
