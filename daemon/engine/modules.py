"""The model's module tree: its expert modules (SwitchGLU/SwitchMLP), swapping modules, casting,
and the top-k override."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

from moed.daemon.engine.lookahead import LookaheadUnsupported, block_routers


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
