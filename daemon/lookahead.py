"""Could the next layer's experts be read early? (`moed bench --lookahead`)

Lookahead (mixtral-offloading): apply layer i+1's router to layer i's MoE input and read the
predicted experts while layer i computes. It can only pay if the predictions hit, and on this
machine it would also cost router work and CPU for reads. This measures, on mlx-lm's resident model
and real decode steps, the recall of that prediction (predicted experts among the k actually
chosen), next to the cheapest alternative (the same layer's experts at the previous token, which an
LRU cache already holds) and to chance (k / experts).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from moed.daemon.generate import SamplingParams, run
from moed.daemon.model import find_switches, load_resident, parent_of


class _Tap:
    """Stands in for a MoE block's router: records each decode step's input, then routes as before."""

    def __init__(self, gate, inputs: list):
        self.gate, self.inputs = gate, inputs

    def __call__(self, x: mx.array) -> mx.array:
        if x.shape[-2] == 1:  # one token: a decode step (prefill chunks are left out)
            mx.eval(x)
            self.inputs.append(x)
        return self.gate(x)


def _top_k(logits: mx.array, k: int) -> np.ndarray:
    return np.array(mx.argpartition(logits, kth=-k, axis=-1)[..., -k:]).reshape(-1, k)


def measure(model: str, prompt: str, params: SamplingParams) -> dict:
    net, tokenizer = load_resident(model)
    blocks = [parent_of(net, path) for path, _ in find_switches(net)]
    inputs: list[list] = [[] for _ in blocks]
    gates = [b.gate for b in blocks]
    for b, log in zip(blocks, inputs):
        b.gate = _Tap(b.gate, log)  # a plain attribute: the module's own `gate` stays its parameter
    try:
        res = run(net, tokenizer, prompt, params)
    finally:
        for b, g in zip(blocks, gates):
            del b.gate
    k = next(getattr(blocks[0], a) for a in ("top_k", "num_experts_per_tok") if hasattr(blocks[0], a))
    n_experts = gates[0](inputs[0][0]).shape[-1]
    steps = min(len(x) for x in inputs)
    chosen = [[set(_top_k(gates[i](inputs[i][t]), k)[0]) for t in range(steps)] for i in range(len(blocks))]
    ahead, previous = [], []
    for i in range(1, len(blocks)):
        for t in range(steps):
            predicted = set(_top_k(gates[i](inputs[i - 1][t]), k)[0])  # layer i's router, layer i-1's input
            ahead.append(len(predicted & chosen[i][t]) / k)
            if t:
                previous.append(len(chosen[i][t - 1] & chosen[i][t]) / k)
    return {"engine": "lookahead", "model": str(model), "decode_steps": steps, "tokens": len(res.tokens),
            "top_k": k, "num_experts": n_experts, "recall_lookahead": float(np.mean(ahead)),
            "recall_previous_token": float(np.mean(previous)), "chance": k / n_experts}
