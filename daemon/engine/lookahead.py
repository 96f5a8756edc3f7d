"""Lookahead: a MoE block's own routing step, run early on the previous MoE block's input.

Generic over mlx-lm's MoE blocks. A block's `__call__` *is* its routing step, whatever its router is
called (`gate`, `router`), whatever it returns (logits, `(indices, scores)`), with biases,
correction terms, expert groups, a shared expert or a latent projection around it. So a prediction
runs the next block's own `__call__` on this block's input with its expert module swapped for a
capture that stops the block where it would call its experts, keeping the indices it would pass.
Nothing after that point is built or computed (no expert, no shared expert), nothing is mutated,
and the next block's own router still decides what it computes: a prediction only changes what is
read early. Where a block cannot be routed this way (checked once at load on a zero input, and
guarded at run time), lookahead is off for the model, with the reason.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn


class LookaheadUnsupported(Exception):
    """This model's MoE blocks cannot be routed ahead (the message says why)."""


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
        holder, block = self.holder, self.block
        experts = holder[self.attr]
        holder[self.attr] = self._capture
        try:
            getattr(type(block), "_moed_base", type(block)).__call__(block, *args, **kwargs)
        except _Routed as routed:
            return routed.indices
        finally:
            holder[self.attr] = experts
        raise LookaheadUnsupported(f"{type(block).__name__} returned without calling its experts")

    def dry_run(self, x: mx.array) -> None:
        """The whole block on `x` with zero expert outputs (no expert weight is read); raises
        whatever the block raises."""
        experts = self.holder[self.attr]
        self.holder[self.attr] = _ZeroExperts()
        try:
            mx.eval(getattr(type(self.block), "_moed_base", type(self.block)).__call__(self.block, x))
        finally:
            self.holder[self.attr] = experts


def _module_at(model: nn.Module, path: str) -> nn.Module:
    m = model
    for part in path.split("."):
        m = m[int(part)] if isinstance(m, list) else m[part]
    return m


def _route_zero(router: BlockRouter, x: mx.array) -> str | None:
    """Why `router` cannot route one zero token `x`, or None when it can."""
    name = type(router.block).__name__
    try:
        indices = router((x,), {})
        mx.eval(indices)
    except LookaheadUnsupported as e:
        return str(e)
    except Exception as e:  # any failure of a foreign module: lookahead is only an optimisation
        return f"{name} cannot be routed on a hidden state alone ({type(e).__name__}: {e})"
    if not mx.issubdtype(indices.dtype, mx.integer) or indices.size == 0 \
            or indices.shape[:-1] not in ((1, 1), (1,)):
        return f"{name} passes its experts no per-token integer indices"
    return None


def block_routers(model: nn.Module, switch_paths: list[str], hidden: int) -> list[BlockRouter]:
    """A router per expert module (by module path), in that order, each checked once on a zero
    token; LookaheadUnsupported with the reason where a layer has none.

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
            router = BlockRouter(_module_at(model, block_path), _module_at(model, holder), attr)
            why = _route_zero(router, x)
            if why is None:
                routers.append(router)
                break
        else:
            raise LookaheadUnsupported(f"{why}; no module between it and the decoder layer routes alone")
        if why is not None:
            raise LookaheadUnsupported(why)
    return routers


class Lookahead:
    """Predicts each MoE layer's experts by its block's routing on the previous MoE block's input.

    The blocks are tapped to keep their latest input; `predict(i)` routes block i + 1 on block i's
    (lazy: evaluated with block i's own routing, in its one host sync). A failure turns lookahead
    off for the model with one log line: a prediction is an optimisation, never a requirement.
    """

    def __init__(self, routers: list[BlockRouter], log: Callable[[str], None]):
        self.routers = routers
        self.inputs: list[tuple[tuple, dict] | None] = [None] * len(routers)
        self.off: str | None = None
        self._log = log
        for i, r in enumerate(routers):
            tap(r.block, lambda args, kwargs, i=i: self.inputs.__setitem__(i, (args, kwargs)))

    def predict(self, layer: int) -> mx.array | None:
        """Block layer + 1's expert indices for the tokens block `layer` is computing (lazy)."""
        if self.off is not None or layer + 1 >= len(self.routers) or self.inputs[layer] is None:
            return None
        try:
            return self.routers[layer + 1](*self.inputs[layer])
        except Exception as e:
            self.disable(f"{type(e).__name__}: {e}")
            return None

    def disable(self, reason: str) -> None:
        if self.off is None:
            self.off = reason
            self._log(f"lookahead off: {reason}")

    def close(self) -> None:
        for r in self.routers:
            untap(r.block)
        self.inputs = [None] * len(self.routers)


def attach(model: nn.Module, switch_paths: list[str], hidden: int | None,
           log: Callable[[str], None]) -> Lookahead | None:
    """Lookahead for this model, or None (after one log line saying why) where its blocks cannot
    be routed ahead."""
    try:
        if not hidden:
            raise LookaheadUnsupported("the config names no hidden_size")
        if len(switch_paths) < 2:
            raise LookaheadUnsupported("fewer than two MoE layers")
        routers = block_routers(model, switch_paths, hidden)
    except LookaheadUnsupported as e:
        log(f"lookahead off for {type(model).__module__.rsplit('.', 1)[-1]}: {e}")
        return None
    return Lookahead(routers, log)
