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
import numpy as np

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


def _subclass(module: nn.Module, registry: dict[type, type], make_call: Callable[[type], Callable],
              hook: str, fn: Callable) -> None:
    """Swap `module`'s class for a subclass (made once per class, kept in `registry`) whose `__call__`
    is `make_call(base)` and reaches `fn` as `self.<hook>`: the parameter tree is unchanged."""
    cls = type(module)
    if cls not in registry:
        registry[cls] = type(cls.__name__, (cls,), {"__call__": make_call(cls), "__module__": cls.__module__,
                                                    "_moed_base" + hook: cls})
    object.__setattr__(module, hook, fn)
    module.__class__ = registry[cls]


def _unsubclass(module: nn.Module, hook: str) -> None:
    base = getattr(type(module), "_moed_base" + hook, None)
    if base is not None:
        module.__class__ = base
        del module.__dict__[hook]


def _recording(base: type) -> Callable:
    def __call__(self, *args, **kwargs):
        self._moed_record(args, kwargs)
        return base.__call__(self, *args, **kwargs)
    return __call__


_TAPPED: dict[type, type] = {}


def tap(block: nn.Module, record: Callable[[tuple, dict], None]) -> None:
    """Have `record(args, kwargs)` see every call of `block` (then the original call runs)."""
    _subclass(block, _TAPPED, _recording, "_moed_record", record)


def untap(block: nn.Module) -> None:
    _unsubclass(block, "_moed_record")


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


# ---------------------------------------------------------------------------- forced routing


class RoutingTrace:
    """A trace's routing per MoE layer, for forcing it on a model (`--routing FILE`).

    `routes[layer]`: (tokens, k) experts, in the trace's order; `predictions[layer]`: where the
    trace carries them, (tokens, k') experts predicted for layer + 1 at each of those tokens (the
    trace's lookahead), else None. Built from a moed-trace dict (tools/policy.py documents it;
    `predictions`, when present, lists one entry per step: the experts predicted for the next MoE
    layer, or null). Visits with other than `top_k` experts (unions of several tokens) are left out.
    """

    def __init__(self, trace: dict):
        self.top_k = int(trace["top_k"])
        self.num_experts = [int(n) for n in trace["num_experts"]]
        self.source = trace.get("model") or trace.get("source") or "trace"
        per: list[list[list[int]]] = [[] for _ in self.num_experts]
        ahead: list[list] = [[] for _ in self.num_experts]
        preds = trace.get("predictions")
        for i, (layer, experts) in enumerate(trace["steps"]):
            if len(experts) == self.top_k:
                per[layer].append(list(experts))
                ahead[layer].append(None if preds is None else preds[i])
        empty = [i for i, p in enumerate(per) if not p]
        if empty:
            raise ValueError(f"the trace has no {self.top_k}-expert visit of MoE layer(s) {empty}")
        self.routes = [np.asarray(p, dtype=np.int32) for p in per]
        self.predictions = [self._predicted(a) for a in ahead]

    @staticmethod
    def _predicted(rows: list) -> np.ndarray | None:
        if not rows or any(r is None for r in rows):
            return None
        width = max(len(r) for r in rows)
        out = np.full((len(rows), width), -1, dtype=np.int32)  # -1: no guess (the store drops them)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out

    @property
    def has_predictions(self) -> bool:
        return all(p is not None for p in self.predictions[:-1])

    def check(self, num_experts: list[int], top_k: int) -> None:
        """ValueError unless the trace's shape is the model's: MoE layers, experts per layer, top-k."""
        if len(num_experts) != len(self.num_experts) or list(num_experts) != self.num_experts:
            raise ValueError(f"--routing: the trace has {len(self.num_experts)} MoE layers of "
                             f"{sorted(set(self.num_experts))} experts, the model {len(num_experts)} of "
                             f"{sorted(set(num_experts))} (make one for this shape: moed trace synth --model)")
        if top_k != self.top_k:
            raise ValueError(f"--routing: the trace routes top-{self.top_k}, the model top-{top_k} "
                             "(same k: set --top-k or make the trace for this k)")


def load_routing(path: str) -> RoutingTrace:
    """Read a trace file for `--routing` (validated by the policy simulator's checker)."""
    from moed.daemon.tools.policy import load_trace  # pure numpy; the engine takes only the checker

    return RoutingTrace(load_trace(path))


class ForcedRouting:
    """Replaces each paged MoE layer's choice of experts by the trace's (same k), so the engine pages,
    reads and computes exactly what the trace asks; the model's output is then not the model's.

    Each layer keeps a cursor into its trace routes: a call on T tokens takes the next T rows
    (wrapping at the end). Where the trace carries predictions, they replace the model's lookahead
    (the next layer's experts predicted at the same tokens); where it does not, lookahead is off
    (the model's own prediction would guess its own routing, not the trace's).

    Args:
        switches: the paged expert modules (experts.PagedSwitch), one per MoE layer, in order.
        trace: the routing to force.
        log: one line per decision worth knowing.
    """

    def __init__(self, switches: list, trace: RoutingTrace, log: Callable[[str], None] = lambda s: None):
        self.trace, self.switches = trace, switches
        self.cursor = [0] * len(switches)
        self.last = [(0, 0)] * len(switches)  # each layer's rows of its latest call
        self.off: str | None = None
        self.lookahead = any(getattr(s, "lookahead", None) is not None for s in switches)
        if self.lookahead:
            if trace.has_predictions:
                for s in switches:
                    s.set_lookahead(self)
            else:
                self.lookahead = False
                for s in switches:
                    s.set_lookahead(None)
                log("lookahead off: the routing trace carries no predictions")
        for i, s in enumerate(switches):
            _force(s, lambda indices, i=i: self.indices(i, indices))

    def indices(self, layer: int, indices: mx.array) -> mx.array:
        """The trace's experts for the next tokens of `layer`, shaped like the model's `indices`."""
        shape = indices.shape
        if shape[-1] != self.trace.top_k:
            raise ValueError(f"--routing: layer {layer} routes {shape[-1]} experts, the trace {self.trace.top_k}")
        routes = self.trace.routes[layer]
        n = int(np.prod(shape[:-1]))
        start = self.cursor[layer]
        rows = np.arange(start, start + n) % len(routes)
        self.cursor[layer] = start + n
        self.last[layer] = (start, n)
        return mx.array(routes[rows].reshape(shape)).astype(indices.dtype)

    # the Lookahead interface PagedSwitch uses (predict / disable / off)
    def predict(self, layer: int) -> mx.array | None:
        """The trace's prediction of layer + 1's experts at the tokens `layer` computes now."""
        preds = self.trace.predictions[layer] if layer + 1 < len(self.switches) else None
        if preds is None:
            return None
        start, n = self.last[layer]
        return mx.array(preds[np.arange(start, start + n) % len(preds)].reshape(-1))

    def disable(self, reason: str) -> None:
        self.off = self.off or reason

    def close(self) -> None:
        for s in self.switches:
            _unforce(s)


def _replacing(base: type) -> Callable:
    def __call__(self, x, indices, *args, **kwargs):
        return base.__call__(self, x, self._moed_replace(indices), *args, **kwargs)
    return __call__


_FORCED: dict[type, type] = {}


def _force(switch: nn.Module, replace: Callable[[mx.array], mx.array]) -> None:
    """Have `switch(x, indices)` compute on `replace(indices)` instead."""
    _subclass(switch, _FORCED, _replacing, "_moed_replace", replace)


def _unforce(switch: nn.Module) -> None:
    _unsubclass(switch, "_moed_replace")


def force_routing(pm, trace: RoutingTrace, log: Callable[[str], None] = lambda s: None) -> ForcedRouting:
    """Force `trace` on a paged model (loader.PagedModel); ValueError when the shapes differ."""
    from moed.daemon.engine.experts import PagedSwitch

    switches = sorted((m for _, m in pm.model.named_modules() if isinstance(m, PagedSwitch)), key=lambda s: s.layer)
    trace.check(pm.info["experts_per_layer"], pm.top_k)
    return ForcedRouting(switches, trace, log)
