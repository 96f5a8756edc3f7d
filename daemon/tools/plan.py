"""`moed plan`: what a configuration needs, from the headers alone, and how fast it should decode.

Memory: non-expert weights + expert cache (slots per layer x expert size) + the workers' staging
buffer + the KV cache of --max-batch sequences at a context length + their prompts' activations of one
--prefill-chunk + the prompt cache + the rest (Python, MLX's buffer cache, the workers).
`load_paged` checks the same figures (without a KV cache) against the memory available before it
reads anything, so a configuration that cannot fit is refused instead of swapping.

Speed: a profile of this machine, measured in seconds (the expert matmuls of one token at the
model's shapes and quantization; parallel reads of the checkpoint's expert ranges, cold), and a
model of a decode step: per MoE layer the misses are read while the resident experts compute,
then they are copied into their slots and compute; the non-expert weights run at the same bytes/s
as the experts. Left out: the router's host sync per layer (measured ~8% on med).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from moed.daemon.engine.budget import RUNTIME_BYTES, WORKER_BYTES, available_bytes
from moed.daemon.engine.index import DTYPE_BYTES, FLOATS, ExpertLayer, TensorTable
from moed.ipc.config import PagingConfig


@dataclass
class Plan:
    model: str
    moe_layers: int
    experts_per_layer: int
    top_k: int
    slots_per_layer: list[int]
    expert_nbytes: int  # one expert, as cached
    non_expert_bytes: int
    expert_bytes: int  # all experts on disk
    cache_bytes: int
    staging_bytes: int
    kv_bytes: int
    context: int
    rest_bytes: int
    ram_bytes: int
    prompt_cache_bytes: int = 0  # the in-memory prompt cache's bound (--prompt-cache-gb, else its default)
    max_batch: int = 1  # sequences whose KV cache is counted (--max-batch)
    prefill_chunk: int = 512  # --prefill-chunk
    prefill_bytes: int = 0  # max_batch prompts' activations of one chunk at `context` (one layer at a time)
    forecast: dict = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return (self.non_expert_bytes + self.cache_bytes + self.staging_bytes + self.kv_bytes + self.rest_bytes
                + self.prompt_cache_bytes + self.prefill_bytes)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.ram_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes, "fits": self.fits}

    def lines(self) -> list[tuple[str, int, str]]:
        return [("non-expert weights", self.non_expert_bytes, "resident"),
                ("expert cache", self.cache_bytes,
                 f"{self.slots_per_layer[0]} of {self.experts_per_layer} experts x {self.moe_layers} layers"),
                ("staging (shared memory)", self.staging_bytes, "the largest layer's misses at once"),
                ("KV cache", self.kv_bytes, f"{self.max_batch} sequences x {self.context} tokens (--max-batch)"),
                ("prefill activations", self.prefill_bytes,
                 f"{self.max_batch} prompts x {self.prefill_chunk}-token chunk at {self.context} (--prefill-chunk)"),
                ("prompt cache", self.prompt_cache_bytes, "reusable prompt prefixes (--prompt-cache-gb)"),
                ("the rest", self.rest_bytes, "Python, MLX buffer cache, I/O workers")]








@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint's headers and config say; read once, planned for many configurations."""

    path: Path
    config: dict
    table: TensorTable
    layers: list[ExpertLayer]
    attn_layers: int  # layers with a KV cache (others keep a fixed-size state)


def read_checkpoint(model: str | Path) -> Checkpoint:
    """Headers only: mlx-lm builds the model lazily, no weight is read."""
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    from moed.daemon.engine.checkpoint import index_experts, lazy_model, resolve_model
    from moed.daemon.engine.modules import find_switches

    path = resolve_model(model)
    net, config = lazy_model(path)
    table, layers = index_experts(path, find_switches(net))
    return Checkpoint(path, config, table, layers, sum(isinstance(c, KVCache) for c in make_prompt_cache(net)))


def _kv_bytes(ck: Checkpoint, context: int, act_bytes: int) -> int:
    """One sequence's KV cache bytes at `context` tokens: attention layers x 2 x kv heads x head dim."""
    from moed.daemon.engine.admission import kv_bytes_per_token

    return kv_bytes_per_token(ck.config, ck.attn_layers, act_bytes) * context


def make_plan(model: str | Path | Checkpoint, paging: PagingConfig | None = None, *, context: int | None = None,
              ram_gb: float | None = None, prompt_cache_gb: float | None = None, max_batch: int | None = None,
              prefill_chunk: int | None = None, **options: Any) -> Plan:
    """The memory a configuration needs, from the headers only (pass a Checkpoint to read them once).

    `paging` (and `options`, PagingConfig fields set over it) as `load_paged` takes them; the
    fields that size the cache count (PagingConfig.sizing()), and lookahead's staging when set;
    `prompt_cache_gb` None: the prompt cache the daemon would size itself (prompt_cache.default_bytes);
    `max_batch`, `prefill_chunk` None: ServingConfig's defaults (the KV cache of max_batch sequences at
    `context`, and their prompts' activations of one prefill chunk, as admission.py reserves them).
    """
    from moed.daemon.engine.admission import prefill_bytes
    from moed.daemon.engine.budget import auto_lookahead, cached_expert_nbytes, slots_per_layer, staging_bytes
    from moed.daemon.engine.checkpoint import top_k_of
    from moed.daemon.engine.core import context_length
    from moed.daemon.engine.loader import DTYPES
    from moed.daemon.engine.prompt_cache import default_bytes
    from moed.ipc.config import ServingConfig

    paging = replace(paging or PagingConfig(), **options)
    ck = model if isinstance(model, Checkpoint) else read_checkpoint(model)
    path, config, table, layers = ck.path, ck.config, ck.table, ck.layers
    cast = DTYPES[paging.dtype] if paging.dtype else None
    k = paging.top_k or top_k_of(config)
    slots = slots_per_layer(layers, k, cast, paging.cache_fraction, paging.cache_gb)
    per = [cached_expert_nbytes(layer, cast) for layer in layers]
    expert_names = {t.info.name for layer in layers for t in layer.tensors}
    non_expert = 0
    float_bytes = 4
    for name, info in table.tensors.items():
        if name in expert_names:
            continue
        if info.dtype in FLOATS:
            float_bytes = cast.size if cast is not None else DTYPE_BYTES[info.dtype]
            non_expert += info.nbytes // DTYPE_BYTES[info.dtype] * float_bytes
        else:
            non_expert += info.nbytes
    context = context or context_length(config)
    max_batch = max_batch or ServingConfig().max_batch
    prefill_chunk = min(prefill_chunk or ServingConfig().prefill_chunk, context)
    fixed, per_token = prefill_bytes(config, prefill_chunk, float_bytes)
    ahead = auto_lookahead(slots, layers) if paging.lookahead is None else paging.lookahead
    cache_bytes = sum(n * p for n, p in zip(slots, per))
    prompt_cache = int(prompt_cache_gb * 1e9) if prompt_cache_gb is not None else default_bytes(
        non_expert + cache_bytes, int(ram_gb * 1e9) if ram_gb else None)
    return Plan(model=str(path), moe_layers=len(layers), experts_per_layer=layers[0].num_experts, top_k=k,
                slots_per_layer=slots, expert_nbytes=per[0], non_expert_bytes=non_expert,
                expert_bytes=sum(layer.expert_nbytes * layer.num_experts for layer in layers),
                cache_bytes=cache_bytes, prompt_cache_bytes=prompt_cache,
                staging_bytes=staging_bytes(slots, layers, k, ahead),
                kv_bytes=max_batch * _kv_bytes(ck, context, float_bytes), context=context, max_batch=max_batch,
                prefill_chunk=prefill_chunk, prefill_bytes=max_batch * (fixed + per_token * context),
                rest_bytes=RUNTIME_BYTES + paging.workers * WORKER_BYTES,
                ram_bytes=int(ram_gb * 1e9) if ram_gb else available_bytes())


# ---------------------------------------------------------------- this machine's profile


def measure_profile(model: str | Path | Checkpoint, read_mb: int = 256, dtype: str | None = None,
                    cold: bool = True) -> dict:
    """Seconds for one token's experts of one layer, and parallel read GB/s of expert ranges
    (`cold`: from an emptied page cache, where the OS lets us)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import SwitchGLU

    from moed.daemon.engine.checkpoint import top_k_of
    from moed.daemon.engine.loader import DTYPES
    from moed.daemon.tools.iobench import coalesce, drop_page_cache, raw_read

    ck = model if isinstance(model, Checkpoint) else read_checkpoint(model)
    config, table, layers = ck.config, ck.table, ck.layers
    cfg = config.get("text_config", config)
    k = top_k_of(config)
    hidden = cfg["hidden_size"]
    inter = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    q = config.get("quantization", {})
    floats = [i.dtype for i in table.tensors.values() if i.dtype in FLOATS]
    act = DTYPES[dtype] if dtype else {"F32": mx.float32, "F16": mx.float16}.get(floats[0], mx.bfloat16)
    switch = SwitchGLU(hidden, inter, k)  # k experts, one token: a decode step's work in one layer
    switch.set_dtype(act)
    if q:
        nn.quantize(switch, group_size=q.get("group_size", 64), bits=q.get("bits", 4), mode=q.get("mode", "affine"))
    mx.eval(switch.parameters())
    x = mx.random.normal((1, 1, hidden)).astype(act)
    idx = mx.arange(k)[None, None]
    for _ in range(3):
        mx.eval(switch(x, idx))
    n = 20
    t0 = time.perf_counter()
    for _ in range(n):
        mx.eval(switch(x, idx))
    layer_s = (time.perf_counter() - t0) / n
    # cold parallel reads of random experts' ranges
    rng = random.Random(0)
    ranges, total = [], 0
    while total < read_mb << 20:
        layer = rng.choice(layers)
        e = rng.randrange(layer.num_experts)
        ranges += coalesce(layer.ranges(e))
        total += layer.expert_nbytes
    cache_state = drop_page_cache() if cold else "warm"
    read_s = raw_read([str(f) for f in table.files], ranges)
    src = np.random.randint(0, 255, 64 << 20, dtype=np.uint8)  # staging -> slot copies
    dst = np.empty_like(src)
    t0 = time.perf_counter()
    for _ in range(5):
        np.copyto(dst, src)
    copy_gbps = 5 * src.nbytes / (time.perf_counter() - t0) / 1e9
    return {"expert_layer_s": layer_s, "expert_pair_s": layer_s / k,
            "expert_compute_gbps": k * layers[0].expert_nbytes / layer_s / 1e9,
            "disk_gbps": total / read_s / 1e9, "disk_probe_bytes": total, "disk_cache_state": cache_state,
            "copy_gbps": copy_gbps}


@dataclass(frozen=True)
class Machine:
    name: str
    memory_gb: float
    disk_gbps: float  # cold parallel reads of expert records
    expert_gbps: float  # expert weights streamed through the matmuls (one token)
    copy_gbps: float  # staging -> slot copies (moed); 0: none (reads land in place)
    dense_ms: float  # one layer's non-expert work for one token (attention, router, shared expert, overheads)
    source: str


def load_machine(path: str | Path) -> Machine:
    """A hardware profile from a JSON file of Machine's fields (`source` optional), refused by name
    when a field is missing, unknown or not a positive number."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--profile {path}: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"--profile {path}: a JSON object of {', '.join(Machine.__dataclass_fields__)}")
    d = {"name": Path(path).stem, "source": str(path), **d}
    names = set(Machine.__dataclass_fields__)
    if unknown := sorted(set(d) - names):
        raise ValueError(f"--profile {path}: unknown field(s) {', '.join(unknown)}; the fields are {', '.join(names)}")
    if missing := sorted(names - set(d)):
        raise ValueError(f"--profile {path}: missing {', '.join(missing)}")
    for f in ("memory_gb", "disk_gbps", "expert_gbps", "copy_gbps", "dense_ms"):
        if isinstance(d[f], bool) or not isinstance(d[f], (int, float)) or d[f] < 0 or (d[f] == 0 and f != "copy_gbps"):
            raise ValueError(f"--profile {path}: {f} must be a positive number (copy_gbps may be 0), not {d[f]!r}")
    return Machine(**d)


def layer_s(expert_bytes: int, m: Machine, top_k: int, hit: float) -> float:
    """Seconds of one MoE layer for one decoded token (see the module docstring)."""
    read = expert_bytes / (m.disk_gbps * 1e9)
    compute = expert_bytes / (m.expert_gbps * 1e9)
    copy = expert_bytes / (m.copy_gbps * 1e9) if m.copy_gbps else 0.0
    miss = (1 - hit) * top_k
    return max(miss * read, (top_k - miss) * compute) + miss * (compute + copy) + m.dense_ms / 1e3


def measured_machine(plan: Plan, profile: dict) -> Machine:
    """This machine's measured profile (`measure_profile`) as a Machine: the non-expert
    weights run at the experts' bytes/s, spread evenly over the MoE layers."""
    gbps = profile["expert_compute_gbps"]
    return Machine("this machine", plan.ram_bytes / 1e9, profile["disk_gbps"], gbps, profile["copy_gbps"],
                   plan.non_expert_bytes / (gbps * 1e9) / plan.moe_layers * 1e3, "measured by moed plan")


def trace_hit_rate(plan: Plan, trace: str | Path, eviction: str) -> float:
    """The hit rate of `eviction` on a routing trace at this plan's slots per layer (the policy
    simulator; the trace's shape must be the model's: experts per layer and top-k)."""
    from moed.daemon.tools.policy import load_trace, simulate

    try:
        t = load_trace(trace)
    except (OSError, ValueError) as e:
        raise ValueError(f"--trace {e}") from None
    shape = (len(t["num_experts"]), set(t["num_experts"]), t["top_k"])
    if shape != (plan.moe_layers, {plan.experts_per_layer}, plan.top_k):
        raise ValueError(f"--trace {trace}: {shape[0]} MoE layers of {'/'.join(map(str, sorted(shape[1])))} experts, "
                         f"top-{t['top_k']}; the model has {plan.moe_layers} of {plan.experts_per_layer}, top-{plan.top_k}")
    fraction = sum(plan.slots_per_layer) / len(plan.slots_per_layer) / plan.experts_per_layer
    return simulate(t, eviction, "per_layer", fraction)["hit_rate"] if fraction < 1 else 1.0


def forecast(plan: Plan, machine: Machine, hit: float | None = None) -> dict:
    """Decode tok/s of this plan on `machine` (layer_s per MoE layer). `hit`: the hit rate
    of a routing trace; None: uniform routing, each layer's hit rate its cached share."""
    k, n = plan.top_k, plan.expert_nbytes
    hits = [min(1.0, s / plan.experts_per_layer) if hit is None else hit for s in plan.slots_per_layer]
    step = sum(layer_s(n, machine, k, h) for h in hits)
    dense_s = plan.moe_layers * machine.dense_ms / 1e3
    return {"decode_tps": 1 / step, "step_s": step, "dense_s": dense_s, "experts_s": step - dense_s,
            "hit_rate": sum(hits) / len(hits), "routing": "uniform" if hit is None else "trace",
            "resident_decode_tps": 1 / (plan.moe_layers * layer_s(n, machine, k, 1.0)), "machine": asdict(machine)}


def largest_fraction(plan_for, ram_bytes: int) -> float | None:
    """The largest cache fraction (of 1, 0.9, ..., 0.05, 0.01) whose plan fits in `ram_bytes`."""
    for f in (1.0, 0.9, 0.75, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05, 0.01):
        if plan_for(f).total_bytes <= ram_bytes:
            return f
    return None
