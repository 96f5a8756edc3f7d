"""Loading: an mlx-lm model with resident non-expert weights and paged experts.

mlx-lm builds the model and loads the checkpoint lazily; every SwitchGLU/SwitchMLP then has its
stacked expert tensors swapped for slot pools before anything is evaluated, so no expert byte is
read at load. Works for every mlx-lm MoE architecture without per-model code.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import psutil
from mlx.utils import tree_flatten, tree_map_with_path, tree_unflatten
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP
from mlx_lm.utils import load_config, load_model, load_tokenizer

from moed.daemon.experts import ExpertStore, PagedSwitch
from moed.daemon.fetcher import Fetcher
from moed.daemon.lookahead import LookaheadUnsupported, attach, block_routers
from moed.daemon.plan import check_fits
from moed.ipc.connection import daemon_files
from moed.workers.index import DTYPE_BYTES, FLOATS, CheckpointError, ExpertLayer, TensorTable

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
MLX_CACHE_LIMIT = 256 << 20  # bytes of freed buffers MLX may keep for reuse
# lookahead by default when a layer caches at most this share of its experts: every partial cache,
# since it measured faster at 50%, 25% and 10% (bench/results/med-lookahead.json)
LOOKAHEAD_BELOW = 0.99


# ---------------------------------------------------------------- where the model is


def hf_cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return dirs


def resolve_model(model: str | Path) -> Path:
    """A checkpoint directory, or a Hugging Face repo id already in the local HF cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path}: no config.json, not a model directory")
        return path
    looked = [str(path)]
    if "/" in str(model) and not str(model).startswith((".", "/")):
        repo = "models--" + str(model).replace("/", "--")
        for cache in hf_cache_dirs():
            snapshots = cache / repo / "snapshots"
            looked.append(str(snapshots))
            ref = cache / repo / "refs" / "main"
            if ref.exists() and (snapshots / ref.read_text().strip() / "config.json").exists():
                return snapshots / ref.read_text().strip()
            found = sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime)
            if found:
                return found[-1].parent
    raise CheckpointError(f"model {model!s} not found (nothing is downloaded); looked in: " + ", ".join(looked))


# ---------------------------------------------------------------- mlx-lm pieces


def cast_floats(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast floating parameters as mlx_lm.convert does (honouring the model's cast_predicate)."""
    pred = getattr(model, "cast_predicate", None)
    if pred is None:
        pred = getattr(getattr(model, "language_model", None), "cast_predicate", None)
    pred = pred or (lambda _: True)

    def cast(path, v):
        return v.astype(dtype) if pred(path) and mx.issubdtype(v.dtype, mx.floating) else v

    model.update(tree_map_with_path(cast, model.parameters()))


def find_switches(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every mlx-lm expert module (SwitchGLU / SwitchMLP) by module path, in layer order."""
    found = [(p, m) for p, m in model.named_modules() if isinstance(m, (SwitchGLU, SwitchMLP))]
    return sorted(found, key=lambda pm: [int(t) if t.isdigit() else -1 for t in pm[0].split(".")])


def parent_of(model: nn.Module, path: str) -> nn.Module:
    """The module holding the module at `path` (for an expert module: its MoE block)."""
    parent = model
    for part in path.split(".")[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    return parent


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    setattr(parent_of(model, path), path.split(".")[-1], module)


TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "moe_topk", "moe_top_k", "n_activated_experts")


def set_top_k(model: nn.Module, k: int, hidden: int | None) -> None:
    """Route every token to `k` experts instead of the config's top-k.

    Sets the top-k attribute of every MoE block and of its router modules, then checks on a zero
    token that each block now routes k experts and still runs (with zero expert outputs, nothing
    read); ValueError naming the architecture where it does not.
    """
    arch = type(model).__module__.rsplit(".", 1)[-1]
    try:
        routers = block_routers(model, [p for p, _ in find_switches(model)], hidden or 0)
    except LookaheadUnsupported as e:
        raise ValueError(f"--top-k is not supported for {arch}: its routing cannot be checked ({e})") from None
    for r in routers:
        for _, m in r.block.named_modules():
            for name in TOP_K_ATTRS:
                if type(getattr(m, name, None)) is int:
                    setattr(m, name, k)
    x = mx.zeros((1, 1, hidden), dtype=mx.float32)
    for r in routers:
        try:
            got = r((x,), {}).shape[-1]
            r.dry_run(x)
        except Exception as e:
            raise ValueError(f"--top-k {k} is not supported for {arch}: {type(r.block).__name__} fails "
                             f"with it ({type(e).__name__}: {e})") from None
        if got != k:
            raise ValueError(f"--top-k is not supported for {arch}: {type(r.block).__name__} still routes "
                             f"{got} experts per token (its top-k is not an attribute moed can set)")


def log(msg: str) -> None:
    print(f"[moed] {msg}", file=sys.stderr, flush=True)


def hidden_size_of(config: dict) -> int | None:
    for cfg in (config, config.get("text_config", {})):
        for key in ("hidden_size", "d_model", "model_dim", "n_embd", "dim"):
            if isinstance(cfg.get(key), int):
                return cfg[key]
    return None


TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_top_k", "top_k")


def top_k_of(config: dict) -> int:
    """Experts per token from the config (a per-layer list: its largest)."""
    for cfg in (config, config.get("text_config", {})):
        for key in TOP_K_KEYS:
            if key in cfg:
                k = cfg[key]
                return int(max(k) if isinstance(k, (list, tuple)) else k)
    raise CheckpointError(f"config.json names no experts per token (none of {', '.join(TOP_K_KEYS)})")


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


def index_experts(path: Path, switches: list[tuple[str, nn.Module]],
                  packed: bool = True) -> tuple[TensorTable, list[ExpertLayer]]:
    """The byte ranges of every switch module's experts (from the pack if current), validated
    against the model's shapes."""
    if not switches:
        raise CheckpointError(f"{path}: no SwitchGLU/SwitchMLP layers, not a mixture-of-experts model")
    table = TensorTable(path, packed)
    return table, [table.expert_layer(p, {k: v.shape for k, v in tree_flatten(m.parameters())})
                   for p, m in switches]


def expert_index(model: str | Path, packed: bool = True) -> tuple[TensorTable, list[ExpertLayer], dict]:
    """Headers only: the expert index and config of a checkpoint (nothing is read but headers)."""
    path = resolve_model(model)
    net, config = load_model(path, lazy=True)
    table, layers = index_experts(path, find_switches(net), packed)
    return table, layers, config


# ---------------------------------------------------------------- cache sizing


def cached_expert_nbytes(layer: ExpertLayer, cast: mx.Dtype | None) -> int:
    """Bytes one expert takes in the pool (after an optional cast of its float tensors)."""
    total = 0
    for t in layer.tensors:
        if cast is not None and t.info.dtype in FLOATS:
            total += t.expert_nbytes // DTYPE_BYTES[t.info.dtype] * cast.size
        else:
            total += t.expert_nbytes
    return total


def auto_lookahead(n_slots: list[int], layers: list[ExpertLayer]) -> bool:
    return min(n / layer.num_experts for n, layer in zip(n_slots, layers)) <= LOOKAHEAD_BELOW


def staging_bytes(n_slots: list[int], layers: list[ExpertLayer], top_k: int, lookahead: bool) -> int:
    """The workers' shared memory: a layer's whole cache (warm-up, long prompts), and with
    lookahead a decode step's own misses plus the next layer's read in flight at once."""
    return max(max(n, 2 * top_k if lookahead else 0) * layer.expert_nbytes for n, layer in zip(n_slots, layers))


def slots_per_layer(layers: list[ExpertLayer], top_k: int, cast: mx.Dtype | None,
                    fraction: float | None = None, gb: float | None = None) -> list[int]:
    """Slots each layer gets: a fraction of its experts, or an even split of a byte budget.

    Never fewer than top-k (one token's experts must fit at once) nor more than all experts.
    Neither given: everything if it fits in half of this machine's RAM, else what does.
    """
    per = [cached_expert_nbytes(layer, cast) for layer in layers]
    if fraction is None and gb is None:
        total = sum(p * layer.num_experts for p, layer in zip(per, layers))
        half_ram = psutil.virtual_memory().total // 2
        fraction, gb = (1.0, None) if total <= half_ram else (None, half_ram / 1e9)
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"--cache-fraction must be in (0, 1], got {fraction}")
        want = [round(fraction * layer.num_experts) for layer in layers]
    else:
        if gb <= 0:
            raise ValueError(f"--cache-gb must be positive, got {gb}")
        want = [int(gb * 1e9 / sum(per))] * len(layers)
    return [min(layer.num_experts, max(top_k, w)) for layer, w in zip(layers, want)]


# ---------------------------------------------------------------- the paged model


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

    def close(self) -> None:
        self.fetcher.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_paged(model: str | Path, *, cache_fraction: float | None = None, cache_gb: float | None = None,
               workers: int = 2, dtype: str | None = None,
               warm: bool = True, top_k: int | None = None,
               progress: Callable[[str, float], None] | None = None,
               group: mx.distributed.Group | None = None, packed: bool = True,
               direct: bool = False, lookahead: bool | None = None) -> PagedModel:
    """Load a checkpoint with resident non-expert weights and a bounded expert cache.

    Args:
        model: checkpoint directory or Hugging Face repo id in the local HF cache.
        cache_fraction: share of each layer's experts to keep resident.
        cache_gb: expert cache budget in GB (alternative to cache_fraction).
        workers: I/O worker processes.
        dtype: cast floating weights and scales to this dtype ("float32"), at load and as
            experts are paged in.
        warm: fill the cache before returning (else it fills on demand).
        top_k: route each token to this many experts instead of the config's top-k.
        progress: called with (phase, fraction done) as loading goes.
        group: the ranks this model is split across (mlx-lm's pipeline split); this rank loads
            and pages only its own layers.
        packed: read experts from the checkpoint's `moed pack` store when it is current.
        direct: read experts bypassing the page cache (O_DIRECT / F_NOCACHE).
        lookahead: while decoding, read the next MoE layer's experts as predicted by its router
            on this layer's input; None: when the cache holds at most LOOKAHEAD_BELOW of a layer.
    """
    report = progress or (lambda phase, done: None)
    report("building the model", 0.0)
    path = resolve_model(model)
    cast = DTYPES[dtype] if dtype else None
    mx.set_cache_limit(MLX_CACHE_LIMIT)
    try:
        net, config = load_model(path, lazy=True)
    except (ValueError, KeyError) as e:  # mlx-lm's strict load names the bad tensor
        raise CheckpointError(f"{path}: cannot load: {e}") from e
    if cast is not None:
        cast_floats(net, cast)  # lazy: expert tensors are cast too, but never evaluated
    layer_range = (0, len(net.layers))
    if group is not None and group.size() > 1:
        from moed.daemon.ranks import split_layers

        layer_range = split_layers(net, group)  # the other layers' lazy weights are never read
    switches = find_switches(net)
    report("indexing experts", 0.05)
    table, layers = index_experts(path, switches, packed)
    if table.pack_note:
        log(table.pack_note)
    if top_k:
        set_top_k(net, top_k, hidden_size_of(config))
    top_k = top_k or top_k_of(config)
    n_slots = slots_per_layer(layers, top_k, cast, cache_fraction, cache_gb)
    if lookahead is None:
        lookahead = auto_lookahead(n_slots, layers)
    staging = staging_bytes(n_slots, layers, top_k, lookahead)
    expert_params = tuple(p + "." for p, _ in switches)
    resident = [v for k, v in tree_flatten(net.parameters()) if not k.startswith(expert_params)]
    non_expert = sum(v.nbytes for v in resident)  # lazy: shapes only, nothing read yet
    check_fits(non_expert, sum(n * cached_expert_nbytes(layer, cast) for n, layer in zip(n_slots, layers)),
               staging, workers)
    report("starting I/O workers", 0.1)
    fetcher = Fetcher([str(f) for f in table.files], workers=workers, staging_bytes=staging,
                      runtime_dir=daemon_files().dir, direct=direct).start()
    try:
        store = ExpertStore(layers, n_slots, fetcher, cast)
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
        warm_bytes = store.warm(progress=lambda f: report("warming the expert cache", 0.65 + 0.3 * f)) if warm else 0
        report("loading the tokenizer", 0.95)
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except BaseException:
        fetcher.close()
        raise
    expert_bytes = sum(layer.expert_nbytes * layer.num_experts for layer in layers)
    report("ready", 1.0)
    return PagedModel(net, tokenizer, config, path, store, fetcher, non_expert, expert_bytes, top_k,
                      info={"moe_layers": len(layers), "slots_per_layer": n_slots,
                            "experts_per_layer": [layer.num_experts for layer in layers],
                            "cache_bytes": store.resident_bytes(), "warm_bytes": warm_bytes,
                            "layer_range": layer_range, "packed": bool(table.packed),
                            "lookahead": bool(lookahead)})
