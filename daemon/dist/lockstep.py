"""Lockstep: the engine core of a model split across ranks runs the same on every rank.

Rank 0 serves the clients through a `LockstepCore`, which records every add/abort and broadcasts
them as one RankPlan before each model step; the other ranks run `follow`, replaying each plan
on their own EngineCore. The core is deterministic given its inputs (and a shared seed), so every
rank's BatchGenerator makes the same calls and the pipeline's sends and receives pair up. Ranks
share one fate: a failed step ends every rank (mlx.launch then stops the rest).
"""

from __future__ import annotations

import dataclasses
import time

from moed.daemon.dist.ranks import RankLink, rank_status
from moed.daemon.engine.core import EngineCore, StepFailed
from moed.ipc.messages import Generate, RankPlan, RankStatus

GATHER_EVERY_S = 1.0  # how stale `moed ps` may show the other ranks while decoding


class RankFailed(StepFailed):
    """A model step failed on a split model: the ranks can no longer agree, so all stop. Raised
    from the step's StepFailed (chained: the cause and its traceback stay with it); `events` are
    the failed requests' Error events."""


class LockstepCore:
    """Rank 0's EngineCore: the same interface, every change mirrored to the other ranks."""

    def __init__(self, core: EngineCore, link: RankLink, pm):
        self.core, self.link, self.pm = core, link, pm
        self.ops: list = []
        self.ranks: list[RankStatus] = self._gather(RankPlan([], gather=True))
        self._gathered = time.monotonic()

    def __getattr__(self, name):  # snapshot, totals, has_work, ...: the core's own
        return getattr(self.core, name)

    def add(self, g: Generate, client: str = "") -> None:
        self.core.add(g, client)  # raises RequestRejected alike on every rank: only admitted ones are sent
        self.ops.append(["add", [getattr(g, f.name) for f in dataclasses.fields(g)], client])

    def abort(self, req_id: str, reason: str = "abort") -> list:
        events = self.core.abort(req_id, reason)
        if events:
            self.ops.append(["abort", req_id, reason])
        return events

    def shutdown(self) -> list:
        return [e for rid in list(self.core.requests) for e in self.abort(rid, "shutdown")]

    def step(self) -> list:
        """One step on every rank; a failed step raises RankFailed (never the core's failure events)."""
        gather = time.monotonic() - self._gathered >= GATHER_EVERY_S
        self._send(RankPlan(self.ops, step=True, gather=gather))
        try:
            events = self.core.try_step()
        except StepFailed as e:
            raise RankFailed(f"a step failed on rank 0: {e}", e.events) from e
        if gather:
            self.ranks = self.link.gather(rank_status(self.pm, 0))
            self._gathered = time.monotonic()
        return events

    try_step = step  # not the core's own (through __getattr__): a step runs on every rank

    def close(self) -> None:
        """Tell the other ranks to exit (after their last plan)."""
        self._send(RankPlan(self.ops, stop=True))

    def _send(self, plan: RankPlan) -> None:
        self.link.broadcast(plan)
        self.ops = []

    def _gather(self, plan: RankPlan) -> list[RankStatus]:
        self._send(plan)
        return self.link.gather(rank_status(self.pm, 0))


def replay(core: EngineCore, plan: RankPlan) -> None:
    """Apply rank 0's recorded adds and aborts to this rank's core, in order."""
    for op in plan.ops:
        if op[0] == "add":
            core.add(Generate(*op[1]), client=op[2])
        else:
            core.abort(op[1], op[2])


def follow(core: EngineCore, link: RankLink, pm) -> None:
    """A rank > 0: replay rank 0's plans until told to stop."""
    while True:
        plan = link.broadcast()
        replay(core, plan)
        if plan.step:
            try:
                core.try_step()
            except StepFailed as e:
                raise RankFailed(f"a step failed on rank {link.rank}: {e}", e.events) from e
        if plan.gather:
            link.gather(rank_status(pm, link.rank))
        if plan.stop:
            return
