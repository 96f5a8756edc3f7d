"""Could the next layer's experts be read early? (`moed bench --lookahead`)

Lookahead (mixtral-offloading): route layer i+1's MoE block on layer i's MoE input and read the
predicted experts while layer i computes. It can only pay if the predictions hit. This measures, on
mlx-lm's resident model and real decode steps, the recall of that prediction (predicted experts
among the k actually chosen), next to the cheapest alternative (the same layer's experts at the
previous token, which an LRU cache already holds) and to chance (k / experts). The routing is each
block's own (daemon/lookahead.py), so it works for every architecture lookahead works for.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np

from moed.daemon.engine.checkpoint import hidden_size_of, resolve_model
from moed.daemon.engine.generate import SamplingParams, run
from moed.daemon.engine.loader import load_resident
from moed.daemon.engine.lookahead import tap, untap
from moed.daemon.engine.modules import find_switches
from moed.daemon.engine.routing import block_routers


def _chosen(indices: mx.array) -> set[int]:
    return set(np.array(indices).reshape(-1).tolist())


def measure(model: str, prompt: str, params: SamplingParams) -> dict:
    net, tokenizer = load_resident(model)
    config = json.loads((resolve_model(model) / "config.json").read_text())
    switches = find_switches(net)
    routers = block_routers(net, [p for p, _ in switches], hidden_size_of(config))
    inputs: list[list] = [[] for _ in routers]

    def record(i):
        def keep(args, kwargs):
            if args and isinstance(args[0], mx.array) and args[0].ndim == 3 and args[0].shape[-2] == 1:
                mx.eval(args[0])  # one token: a decode step (prefill is left out)
                inputs[i].append((args, kwargs))
        return keep

    for i, r in enumerate(routers):
        tap(r.block, record(i))
    try:
        res = run(net, tokenizer, prompt, params)
    finally:
        for r in routers:
            untap(r.block)
    steps = min(len(x) for x in inputs)
    chosen = [[_chosen(routers[i](*inputs[i][t])) for t in range(steps)] for i in range(len(routers))]
    k = len(chosen[0][0])
    ahead, previous = [], []
    for i in range(1, len(routers)):
        for t in range(steps):
            predicted = _chosen(routers[i](*inputs[i - 1][t]))  # layer i's routing, layer i-1's input
            ahead.append(len(predicted & chosen[i][t]) / len(chosen[i][t]))
            if t:
                previous.append(len(chosen[i][t - 1] & chosen[i][t]) / len(chosen[i][t]))
    n_experts = next(m.num_experts for _, m in switches[0][1].named_modules() if hasattr(m, "num_experts"))
    return {"engine": "lookahead", "model": str(model), "decode_steps": steps, "tokens": len(res.tokens),
            "top_k": k, "num_experts": n_experts, "recall_lookahead": float(np.mean(ahead)),
            "recall_previous_token": float(np.mean(previous)), "chance": k / n_experts}
