"""Lookahead: a MoE block's own routing step, run early on the previous MoE block's input.

Generic over mlx-lm's MoE blocks: a prediction is the next block's own routing step
(routing.BlockRouter) run on this block's input, which a tap on the block's class records. The
next block's own router still decides what it computes: a prediction only changes what is
read early. Where a block cannot be routed this way (checked once at load on a zero input, and
guarded at run time), lookahead is off for the model, with the reason.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from moed.daemon.engine.modules import arch_of
from moed.daemon.engine.routing import BlockRouter, RoutingUnsupported, block_routers, tap, untap


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
            raise RoutingUnsupported("the config names no hidden_size")
        if len(switch_paths) < 2:
            raise RoutingUnsupported("fewer than two MoE layers")
        routers = block_routers(model, switch_paths, hidden)
    except RoutingUnsupported as e:
        log(f"lookahead off for {arch_of(model)}: {e}")
        return None
    return Lookahead(routers, log)
