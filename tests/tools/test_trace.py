"""Routing traces, the policy replay on a real trace, and the I/O probe's replay."""

import numpy as np

from moed.daemon.engine.checkpoint import expert_index, top_k_of
from moed.daemon.engine.generate import SamplingParams, run
from moed.daemon.engine.loader import load_paged
from moed.daemon.tools.iobench import miss_ranges, path_read, raw_read
from moed.daemon.tools.policy import simulate, validate_trace
from moed.daemon.tools.trace import record_trace


def test_trace_records_every_decode_visit_and_replays(tiny_models):
    path = tiny_models["mixtral"]
    params = SamplingParams(max_tokens=20, temp=1.0, seed=5)
    prompt = [7]  # one token: no prefill, so every step of the generation is a decode step
    trace = validate_trace(record_trace(str(path), prompt, params))
    n_layers = len(trace["num_experts"])
    # every forward pass visits each MoE layer once, in order (mlx-lm computes one step ahead)
    assert len(trace["steps"]) in (trace["tokens"] * n_layers, (trace["tokens"] + 1) * n_layers)
    assert [layer for layer, _ in trace["steps"][:n_layers]] == list(range(n_layers))
    assert all(len(experts) == trace["top_k"] for _, experts in trace["steps"])
    # the same generation through the engine misses exactly what the LRU replay misses
    with load_paged(path, cache_fraction=0.5, warm=False, lookahead=False, eviction="lru") as pm:  # plain LRU
        run(pm.model, pm.tokenizer, prompt, params)
        live = pm.store.stats
    sim = simulate(trace, "lru", "per_layer", 0.5)
    assert (sim["hits"], sim["misses"]) == (live.hits, live.misses)
    table, layers, config = expert_index(path)
    visits = miss_ranges(trace, layers, 1.0, top_k_of(config))
    expected = sum(len(np.unique(np.concatenate([np.array(e) for l_, e in trace["steps"] if l_ == layer])))
                   for layer in range(n_layers))
    assert sum(len(v) for v in visits) == expected * len(layers[0].tensors)  # compulsory misses only
    files = [str(f) for f in table.files]
    assert raw_read(files, [r for v in visits for r in v]) > 0 and path_read(files, visits, 2) > 0
    assert raw_read(files, [r for v in visits for r in v], direct=True) > 0
    assert path_read(files, visits, 2, in_flight=2) > 0 and path_read(files, visits, 1, direct=True, in_flight=2) > 0
