"""Forced routing (`--routing FILE`): the engine pages exactly the trace's experts."""

import numpy as np
import pytest

from moed.daemon.engine.generate import SamplingParams, run
from moed.daemon.engine.loader import load_paged
from moed.daemon.engine.routing import RoutingTrace, force_routing
from moed.daemon.engine.slots import EVICTIONS
from moed.daemon.tools.policy import HotLRU, simulate
from moed.daemon.tools.trace import Recorder
from moed.daemon.tools.tracesynth import synth

PROMPT = [7]  # one token: every visit is a decode visit of one token
PARAMS = SamplingParams(max_tokens=16, temp=1.0, seed=3, ignore_eos=True)


def _trace_for(pm, tokens=64, seed=1):
    n = pm.info["experts_per_layer"]
    return synth(n[0], pm.top_k, len(n), tokens=tokens, seed=seed)


def test_engine_pages_exactly_the_traces_experts(tiny_model):
    with load_paged(tiny_model("qwen3_moe"), cache_fraction=0.5, warm=False, lookahead=False, eviction="lru") as pm:
        trace = _trace_for(pm)
        forced = force_routing(pm, RoutingTrace(trace))
        rec = pm.store.observe(Recorder())
        run(pm.model, pm.tokenizer, PROMPT, PARAMS)
        pm.store.unobserve(rec)
        stats = pm.store.stats
        forced.close()
    L = len(trace["num_experts"])
    # every visit the engine made is the trace's next visit of that layer, in order
    seen = [0] * L
    for layer, experts in rec.steps:
        assert experts == trace["steps"][seen[layer] * L + layer][1]
        seen[layer] += 1
    assert min(seen) >= PARAMS.max_tokens
    # and it hit and missed exactly what the LRU replay of those visits does (the engine's LRU)
    n_tok = seen[0]
    assert seen == [n_tok] * L
    prefix = {**trace, "steps": trace["steps"][: n_tok * L]}
    prefix.pop("predictions")
    sim = simulate(prefix, "lru", "per_layer", 0.5)
    assert (sim["hits"], sim["misses"]) == (stats.hits, stats.misses)
    assert sim["layer_misses"] == stats.layer_misses


def test_lookahead_reads_the_traces_predictions(tiny_model):
    with load_paged(tiny_model("qwen3_moe"), cache_fraction=0.5, warm=False, lookahead=True) as pm:
        trace = _trace_for(pm)
        rt = RoutingTrace(trace)
        assert rt.has_predictions
        forced = force_routing(pm, rt)
        assert forced.lookahead
        run(pm.model, pm.tokenizer, PROMPT, PARAMS)
        st = pm.store.stats
        forced.close()
    assert st.prefetched > 0 and 0 < st.prefetch_used <= st.prefetched


def test_trace_without_predictions_turns_lookahead_off(tiny_model):
    with load_paged(tiny_model("qwen3_moe"), cache_fraction=0.5, warm=False, lookahead=True) as pm:
        trace = _trace_for(pm)
        trace.pop("predictions")
        lines = []
        forced = force_routing(pm, RoutingTrace(trace), log=lines.append)
        run(pm.model, pm.tokenizer, PROMPT, PARAMS)
        assert pm.store.stats.prefetched == 0 and not forced.lookahead
        assert any("no predictions" in s for s in lines)
        forced.close()


def test_shape_mismatch_is_refused(tiny_model):
    with load_paged(tiny_model("qwen3_moe"), cache_fraction=0.5, warm=False) as pm:
        n = pm.info["experts_per_layer"]
        with pytest.raises(ValueError, match="top-"):
            force_routing(pm, RoutingTrace(synth(n[0], pm.top_k + 1, len(n), tokens=8)))
        with pytest.raises(ValueError, match="MoE layers"):
            force_routing(pm, RoutingTrace(synth(n[0], pm.top_k, len(n) + 1, tokens=8)))


def test_routes_wrap_and_prefill_takes_trace_rows(tiny_model):
    with load_paged(tiny_model("qwen3_moe"), cache_fraction=1.0, warm=False) as pm:
        trace = _trace_for(pm, tokens=5)
        forced = force_routing(pm, RoutingTrace(trace))
        run(pm.model, pm.tokenizer, [7, 8, 9], SamplingParams(max_tokens=4, temp=0.0, ignore_eos=True))
        # 3 prompt tokens + the decode steps: each layer's cursor moved by every token it computed
        assert len(set(forced.cursor)) == 1 and forced.cursor[0] >= 3 + 3
        got = forced.indices(0, _zeros(7, pm.top_k))
        rows = (forced.cursor[0] - 7 + np.arange(5)) % 5  # the rows just taken, wrapped
        assert (np.array(got)[0, :5] == RoutingTrace(trace).routes[0][rows]).all()
        assert got.shape == (1, 7, pm.top_k)
        forced.close()


def _zeros(n, k):
    import mlx.core as mx

    return mx.zeros((1, n, k), dtype=mx.uint32)


@pytest.mark.parametrize("eviction", ["fwlru", "lfuda", "dlfu", "hotlru"])
def test_eviction_pages_what_the_simulator_predicts(tiny_model, eviction):
    fraction = 0.5  # 8 of 16 experts (at 4 = top-k no policy has a choice)
    with load_paged(tiny_model("qwen3_moe"), cache_fraction=fraction, warm=False, warm_start=False,
                    eviction=eviction) as pm:  # no saved counts: hotlru chooses its hot set online
        trace = _trace_for(pm, seed=0)
        forced = force_routing(pm, RoutingTrace(trace))
        run(pm.model, pm.tokenizer, PROMPT, SamplingParams(max_tokens=48, temp=1.0, seed=3, ignore_eos=True))
        stats = pm.store.stats
        assert type(pm.store.slots[0]) is EVICTIONS[eviction]
        n_tok = forced.cursor[0]
        slots, top_k = pm.info["slots_per_layer"], pm.top_k
        forced.close()
    L = len(trace["num_experts"])
    prefix = {**trace, "steps": trace["steps"][: n_tok * L]}
    prefix.pop("predictions")
    if eviction == "hotlru":  # no saved counts (a bench, a first run): the online hot set
        pools = [HotLRU(n, None, top_k) for n in slots]
        layer_hits = [0] * L
        for layer, ex in prefix["steps"]:
            layer_hits[layer] += pools[layer].visit(ex, 0)
        sim = {"hits": sum(layer_hits), "misses": n_tok * L * top_k - sum(layer_hits),
               "layer_misses": [n_tok * top_k - h for h in layer_hits]}
    else:
        sim = simulate(prefix, eviction, "per_layer", fraction)
    assert (sim["hits"], sim["misses"]) == (stats.hits, stats.misses)
    assert sim["layer_misses"] == stats.layer_misses
    assert simulate(prefix, "lru", "per_layer", fraction)["hits"] != sim["hits"]  # it kept other experts than LRU
