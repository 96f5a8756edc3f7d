"""A MoE block's routing step, run on its own.

A block's `__call__` *is* its routing step, whatever its router is called (`gate`, `router`),
whatever it returns (logits, `(indices, scores)`), with biases, correction terms, expert groups, a
shared expert or a latent projection around it. A `BlockRouter` runs that `__call__` with the
block's expert module swapped for a capture that stops the block where it would call its experts,
keeping the indices it would pass: nothing after that point is built or computed, nothing is
mutated. `tap` records a block's inputs (its class swapped for a recording subclass; the routing
step always calls the untapped `__call__`). Lookahead routes the next block early with these
(lookahead.py), `--top-k` checks its override with them (`set_top_k`), and `moed bench
--lookahead` measures recall with them (tools/recall.py).
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from moed.daemon.engine.modules import arch_of, find_switches, module_at


class RoutingUnsupported(Exception):
    """A model's MoE blocks cannot be routed on their own (the message says why)."""


class _Routed(Exception):
    def __init__(self, indices: mx.array):
        super().__init__()
        self.indices = indices


class _Capture(nn.Module):
    """Stands in for a block's expert module during a prediction: stops the block there."""

    def __call__(self, x: mx.array, indices: mx.array, *args, **kwargs):
        raise _Routed(indices)


class _ZeroExperts(nn.Module):
    """Stands in for a block's expert module in a dry run: zero outputs of the usual shape."""

    def __call__(self, x: mx.array, indices: mx.array, *args, **kwargs):
        return mx.zeros((*indices.shape, x.shape[-1]), dtype=x.dtype)


_TAPPED: dict[type, type] = {}


def tap(block: nn.Module, record: Callable[[tuple, dict], None]) -> None:
    """Have `record(args, kwargs)` see every call of `block` (its class is swapped for a subclass
    whose `__call__` records, then calls the original: the parameter tree is unchanged)."""
    cls = type(block)
    if cls not in _TAPPED:
        base = cls

        def __call__(self, *args, **kwargs):
            self._moed_record(args, kwargs)
            return base.__call__(self, *args, **kwargs)

        _TAPPED[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                                   "_moed_base": cls})
    object.__setattr__(block, "_moed_record", record)
    block.__class__ = _TAPPED[cls]


def untap(block: nn.Module) -> None:
    base = getattr(type(block), "_moed_base", None)
    if base is not None:
        block.__class__ = base
        del block.__dict__["_moed_record"]


class BlockRouter:
    """The routing step of one MoE block: `router(args, kwargs)` -> the expert indices the block
    would pass to its expert module (lazy), for any input the block takes.

    Args:
        block: the MoE block: the expert module's parent, or the nearest ancestor below the
            decoder layer that routes on a hidden state alone (e.g. when the parent is a wrapper
            taking `(x, indices, weights)`).
        holder: the expert module's parent.
        attr: the holder's attribute naming the expert module.
    """

    def __init__(self, block: nn.Module, holder: nn.Module, attr: str):
        self.block, self.holder, self.attr = block, holder, attr
        self._capture = _Capture()

    def __call__(self, args: tuple, kwargs: dict) -> mx.array:
        try:
            self._run(self._capture, args, kwargs)
        except _Routed as routed:
            return routed.indices
        raise RoutingUnsupported(f"{type(self.block).__name__} returned without calling its experts")

    def dry_run(self, x: mx.array) -> None:
        """The whole block on `x` with zero expert outputs (no expert weight is read); raises
        whatever the block raises."""
        mx.eval(self._run(_ZeroExperts(), (x,), {}))

    def _run(self, stub: nn.Module, args: tuple, kwargs: dict):
        """The block's own (untapped) `__call__` with `stub` in place of its expert module."""
        experts = self.holder[self.attr]
        self.holder[self.attr] = stub
        try:
            return getattr(type(self.block), "_moed_base", type(self.block)).__call__(self.block, *args, **kwargs)
        finally:
            self.holder[self.attr] = experts


def _route_zero(router: BlockRouter, x: mx.array) -> str | None:
    """Why `router` cannot route one zero token `x`, or None when it can."""
    name = type(router.block).__name__
    try:
        indices = router((x,), {})
        mx.eval(indices)
    except RoutingUnsupported as e:
        return str(e)
    except Exception as e:  # any failure of a foreign module: lookahead is only an optimisation
        return f"{name} cannot be routed on a hidden state alone ({type(e).__name__}: {e})"
    if not mx.issubdtype(indices.dtype, mx.integer) or indices.size == 0 \
            or indices.shape[:-1] not in ((1, 1), (1,)):
        return f"{name} passes its experts no per-token integer indices"
    return None


def block_routers(model: nn.Module, switch_paths: list[str], hidden: int) -> list[BlockRouter]:
    """A router per expert module (by module path), in that order, each checked once on a zero
    token; RoutingUnsupported with the reason where a layer has none.

    The block is the expert module's parent or, failing that, the nearest ancestor below the
    decoder layer (`...layers.N`): a decoder layer also runs attention and writes its cache, so it
    is never run ahead. A block holding several expert modules is refused (a capture could not
    tell them apart).
    """
    x = mx.zeros((1, 1, hidden), dtype=mx.float32)
    routers = []
    for path in switch_paths:
        parts = path.split(".")
        holder, attr = ".".join(parts[:-1]), parts[-1]
        last_index = max((i for i, t in enumerate(parts) if t.isdigit()), default=-1)
        why = "the expert module sits directly in the decoder layer (its router too)"
        for depth in range(len(parts) - 1, last_index + 1, -1):
            block_path = ".".join(parts[:depth])
            if sum(p.startswith(block_path + ".") for p in switch_paths) > 1:
                why = f"{block_path} holds more than one expert module"
                break
            router = BlockRouter(module_at(model, block_path), module_at(model, holder), attr)
            why = _route_zero(router, x)
            if why is None:
                routers.append(router)
                break
        else:
            raise RoutingUnsupported(f"{why}; no module between it and the decoder layer routes alone")
        if why is not None:
            raise RoutingUnsupported(why)
    return routers


TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "moe_topk", "moe_top_k", "n_activated_experts")


def set_top_k(model: nn.Module, k: int, hidden: int | None) -> None:
    """Route every token to `k` experts instead of the config's top-k.

    Sets the top-k attribute of every MoE block and of its router modules, then checks on a zero
    token that each block now routes k experts and still runs (with zero expert outputs, nothing
    read); ValueError naming the architecture where it does not.
    """
    arch = arch_of(model)
    try:
        routers = block_routers(model, [p for p, _ in find_switches(model)], hidden or 0)
    except RoutingUnsupported as e:
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
