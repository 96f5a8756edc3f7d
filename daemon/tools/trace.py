"""Routing traces: which experts each MoE layer needed at each decode step (`moed trace`).

A trace drives the offline policy simulator (policy.py) and the I/O-path probe of the bench.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moed.daemon.engine.generate import SamplingParams, run
from moed.daemon.engine.loader import load_paged


class Recorder:
    """An ExpertStore observer: (layer, experts) of every decode visit, in order."""

    every_visit = True  # fully resident layers are recorded too

    def __init__(self):
        self.steps: list[tuple[int, list[int]]] = []

    def visit(self, layer: int, experts: np.ndarray, decode: bool) -> None:
        if decode:
            self.steps.append((layer, experts.tolist()))


def record_trace(model: str, prompt: str, params: SamplingParams, workers: int = 2) -> dict:
    """Generate once and return the routing trace (decode steps; prefill is left out)."""
    # the routing does not depend on the cache (outputs are exact), so the smallest one will do
    with load_paged(model, cache_fraction=1e-9, workers=workers, warm=False) as pm:
        recorder = pm.store.observe(Recorder())
        try:
            res = run(pm.model, pm.tokenizer, prompt, params)
        finally:
            pm.store.unobserve(recorder)
        return {"kind": "moed-trace", "model": str(pm.path), "top_k": pm.top_k,
                "num_experts": pm.info["experts_per_layer"], "tokens": len(res.tokens),
                "sampling": {"temp": params.temp, "seed": params.seed, "max_tokens": params.max_tokens},
                "steps": [[layer, experts] for layer, experts in recorder.steps]}


def save_trace(trace: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(trace))
