"""Loading: an mlx-lm model with resident non-expert weights and paged experts.

mlx-lm builds the model and loads the checkpoint lazily; every SwitchGLU/SwitchMLP then has its
stacked expert tensors swapped for slot pools before anything is evaluated, so no expert byte is
read at load. Works for every mlx-lm MoE architecture without per-model code.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.pipeline import PipelineMixin
from mlx_lm.utils import load_config, load_tokenizer

from moed.daemon.engine.budget import auto_lookahead, cached_expert_nbytes, check_fits, slots_per_layer, staging_bytes
from moed.daemon.engine.checkpoint import hidden_size_of, index_experts, lazy_model, resolve_model, top_k_of
from moed.daemon.engine.experts import ExpertStore, Heat, PagedSwitch
from moed.daemon.engine.index import CheckpointError
from moed.daemon.engine.lookahead import attach
from moed.daemon.engine.modules import arch_of, cast_floats, find_switches, set_module
from moed.daemon.engine.routing import set_top_k
from moed.daemon.engine.warmstart import WarmStart
from moed.daemon.io.fetcher import Fetcher
from moed.ipc.config import PagingConfig
from moed.ipc.connection import daemon_files

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


MLX_CACHE_LIMIT = 256 << 20  # bytes of freed buffers MLX may keep for reuse


def log(msg: str) -> None:
    print(f"[moed] {msg}", file=sys.stderr, flush=True)


def load_resident(path: str | Path, dtype: str | None = None, top_k: int | None = None):
    """The reference: mlx-lm's own load, everything resident (with the same optional cast)."""
    from mlx_lm import load

    model, tokenizer = load(str(resolve_model(path)))
    if dtype:
        cast_floats(model, DTYPES[dtype])
        mx.eval(model.parameters())
    if top_k:
        set_top_k(model, top_k, hidden_size_of(load_config(resolve_model(path))))
    return model, tokenizer


@dataclass
class PagedModel:
    model: nn.Module
    tokenizer: object
    config: dict
    path: Path
    store: ExpertStore
    fetcher: Fetcher
    non_expert_bytes: int
    expert_bytes: int  # all experts on disk
    top_k: int
    info: dict = field(default_factory=dict)
    heat: Heat | None = None  # the store's use counts (the TUI's heat map, the next warm start)
    warm_start: WarmStart | None = None  # where this run's counts are saved (None: --no-warm-start)

    def save_heat(self) -> None:
        """Save this run's expert use counts for the next load's warm start."""
        if self.warm_start is not None and self.heat is not None:
            try:
                self.warm_start.save(self.heat.counts)
            except OSError as e:
                print(f"[moed] could not save the expert use counts: {e}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.save_heat()
        self.fetcher.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def split_layers(net, group: mx.distributed.Group) -> tuple[int, int]:
    """Keep only this rank's decoder layers (mlx-lm's pipeline split); returns [first, last)."""
    stages = [m for _, m in net.named_modules() if isinstance(m, PipelineMixin)]
    if not stages:
        raise CheckpointError(f"{arch_of(net)}: mlx-lm has no pipeline split for "
                              "this architecture, so it cannot run on several ranks")
    n_layers = len(stages[0].layers)
    if n_layers < group.size():
        raise ValueError(f"{group.size()} ranks for {n_layers} layers: at most one rank per layer")
    stages[0].pipeline(group)
    return stages[0].start_idx, stages[0].end_idx


def load_paged(model: str | Path, paging: PagingConfig | None = None, *,
               progress: Callable[[str, float], None] | None = None,
               group: mx.distributed.Group | None = None, **options: Any) -> PagedModel:
    """Load a checkpoint with resident non-expert weights and a bounded expert cache.

    Args:
        model: checkpoint directory or Hugging Face repo id in the local HF cache.
        paging: the cache's size and how experts are read (moed.ipc.config.PagingConfig, which
            documents each option); default: PagingConfig().
        progress: called with (phase, fraction done) as loading goes.
        group: the ranks this model is split across (mlx-lm's pipeline split); this rank loads
            and pages only its own layers.
        **options: PagingConfig fields set over `paging`: `load_paged(path, cache_fraction=0.25)`.
    """
    paging = replace(paging or PagingConfig(), **options)  # validated: a bad value names its flag
    report = progress or (lambda phase, done: None)
    report("building the model", 0.0)
    path = resolve_model(model)
    cast = DTYPES[paging.dtype] if paging.dtype else None
    mx.set_cache_limit(MLX_CACHE_LIMIT)
    net, config = lazy_model(path)
    if cast is not None:
        cast_floats(net, cast)  # lazy: expert tensors are cast too, but never evaluated
    layer_range = (0, len(net.layers))
    if group is not None and group.size() > 1:
        layer_range = split_layers(net, group)  # the other layers' lazy weights are never read
    switches = find_switches(net)
    report("indexing experts", 0.05)
    table, layers = index_experts(path, switches, paging.packed)
    if table.pack_note:
        log(table.pack_note)
    if paging.top_k:
        set_top_k(net, paging.top_k, hidden_size_of(config))
    top_k = paging.top_k or top_k_of(config)
    n_slots = slots_per_layer(layers, top_k, cast, paging.cache_fraction, paging.cache_gb)
    lookahead = auto_lookahead(n_slots, layers) if paging.lookahead is None else paging.lookahead
    staging = staging_bytes(n_slots, layers, top_k, lookahead)
    expert_params = tuple(p + "." for p, _ in switches)
    resident = [v for k, v in tree_flatten(net.parameters()) if not k.startswith(expert_params)]
    non_expert = sum(v.nbytes for v in resident)  # lazy: shapes only, nothing read yet
    check_fits(non_expert, sum(n * cached_expert_nbytes(layer, cast) for n, layer in zip(n_slots, layers)),
               staging, paging.workers)
    report("starting I/O workers", 0.1)
    fetcher = Fetcher([str(f) for f in table.files], workers=paging.workers, staging_bytes=staging,
                      runtime_dir=daemon_files().dir, direct=paging.direct).start()
    try:
        experts_per_layer = [layer.num_experts for layer in layers]
        warm_start = (WarmStart.for_model(daemon_files().dir, path, experts_per_layer,
                                          f"top_k={top_k}", f"layers={layer_range}") if paging.warm_start else None)
        store = ExpertStore(layers, n_slots, fetcher, cast, eviction=paging.eviction, top_k=top_k,
                            counts=warm_start.before if warm_start is not None else None)  # hotlru's hot set
        paged = []
        for i, (p, m) in enumerate(switches):
            params = [k for k, _ in tree_flatten(m.parameters())]
            m.update(tree_unflatten([(k, pool.array) for k, pool in zip(params, store.pools[i])]))
            paged.append(PagedSwitch(m, store, i))
            set_module(net, p, paged[-1])
        if lookahead:
            ahead = attach(net, [p for p, _ in switches], hidden_size_of(config), log)
            lookahead = ahead is not None
            for here in paged if lookahead else ():
                here.set_lookahead(ahead)
        done = 0
        for v in resident:  # reads the non-expert weights only
            mx.eval(v)
            done += v.nbytes
            report("loading resident weights", 0.15 + 0.5 * done / max(1, non_expert))
        order = warm_start.order() if warm_start is not None and paging.warm else None
        warm_bytes = (store.warm(order, progress=lambda f: report("warming the expert cache", 0.65 + 0.3 * f))
                      if paging.warm else 0)
        heat = store.observe(Heat(experts_per_layer))
        report("loading the tokenizer", 0.95)
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except BaseException:
        fetcher.close()
        raise
    expert_bytes = sum(layer.expert_nbytes * layer.num_experts for layer in layers)
    report("ready", 1.0)
    return PagedModel(net, tokenizer, config, path, store, fetcher, non_expert, expert_bytes, top_k,
                      info={"moe_layers": len(layers), "slots_per_layer": n_slots,
                            "experts_per_layer": experts_per_layer,
                            "cache_bytes": store.resident_bytes(), "warm_bytes": warm_bytes,
                            "warm_from_counts": order is not None,
                            "layer_range": layer_range, "packed": bool(table.packed),
                            "lookahead": bool(lookahead)}, heat=heat, warm_start=warm_start)
