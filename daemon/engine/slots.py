"""Slot bookkeeping for the expert cache: which expert sits in which slot, and what to evict.

Pure Python + numpy (no MLX): the pools themselves live in `experts.py`. Each MoE layer owns a
fixed number of slots; LRU is the baseline eviction policy. `fwlru` mirrors the simulator's FreqLRU;
`lfuda`, `dlfu` and `hotlru` run the simulator's own policy objects (daemon/tools/policy.py, also
pure Python + numpy) as their bookkeeping (`PolicySlots`), so they decide exactly as it does.
The simulator's `leaststale` is not here: it ranks keys across layers, and the engine's pools are
per layer, where it is LRU.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from moed.daemon.tools.policy import LFUDA, DecayedLFU, HotLRU, Policy


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0
    verify_seconds: float = 0.0  # checking packed records' checksums (part of read_seconds)
    prefetched: int = 0  # experts read ahead by lookahead
    prefetch_used: int = 0  # of those, the ones the layer's routing then chose
    layer_hits: list[int] = field(default_factory=list)
    layer_misses: list[int] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def as_dict(self) -> dict:
        return {
            "hits": self.hits, "misses": self.misses,
            "hit_rate": self.hit_rate, "bytes_read": self.bytes_read,
            "read_seconds": self.read_seconds, "verify_seconds": self.verify_seconds,
            "prefetched": self.prefetched, "prefetch_used": self.prefetch_used,
            "layer_hits": list(self.layer_hits), "layer_misses": list(self.layer_misses),
        }


class LayerSlots:
    """The slot table of one layer's pool with LRU eviction.

    Args:
        n_slots: slots in the pool (at least the layer's top-k).
        num_experts: experts of the layer; `lut[e]` is e's slot or -1.
    """

    def __init__(self, n_slots: int, num_experts: int):
        self.n_slots = n_slots
        self.lut = np.full(num_experts, -1, dtype=np.int32)
        self._lru: OrderedDict[int, int] = OrderedDict()  # expert -> slot, oldest first
        self._free = list(range(n_slots - 1, -1, -1))
        self.evictions = 0

    def groups(self, experts: np.ndarray) -> list[np.ndarray]:
        """Split a layer's needed experts into groups that fit the pool at once.

        Resident experts go first so the first group needs the fewest reads.
        """
        if len(experts) <= self.n_slots:
            return [experts]
        resident = self.lut[experts] >= 0
        ordered = np.concatenate([experts[resident], experts[~resident]])
        return [ordered[i : i + self.n_slots] for i in range(0, len(ordered), self.n_slots)]

    def assign(self, experts: np.ndarray) -> tuple[int, list[tuple[int, int]]]:
        """Give every expert of `experts` (unique, at most n_slots) a slot.

        Returns the number of hits and the misses as (expert, slot) pairs to be filled.
        """
        misses, hits = [], 0
        for e in experts.tolist():
            if self.lut[e] >= 0:
                self._lru.move_to_end(e)
                hits += 1
            else:
                misses.append(e)
        filled = []
        for e in misses:
            if self._free:
                slot = self._free.pop()
            else:  # the oldest entries are never in `experts`: those were just moved to the end
                old, slot = self._lru.popitem(last=False)
                self.lut[old] = -1
                self.evictions += 1
            self._lru[e] = slot
            self.lut[e] = slot
            filled.append((e, slot))
        return hits, filled

    def forget(self, experts: list[int]) -> None:
        """Drop experts whose slots could not be filled (a failed read)."""
        for e in experts:
            slot = self._lru.pop(e, None)
            if slot is not None:
                self.lut[e] = -1
                self._free.append(slot)

    @property
    def used(self) -> int:
        return len(self._lru)

    @property
    def full(self) -> bool:
        """Every expert of the layer has a slot."""
        return len(self._lru) == len(self.lut)


class FreqLayerSlots(LayerSlots):
    """The slot table with frequency-weighted LRU eviction (Flash-MoE's CUDA port): the expert of
    lowest uses x 10 + last use is evicted (uses counted over the run, surviving eviction; the clock
    ticks once per `assign`, i.e. per visit of the layer). Mirrors `tools/policy.FreqLRU` exactly."""

    WEIGHT = 10

    def __init__(self, n_slots: int, num_experts: int):
        super().__init__(n_slots, num_experts)
        self.count = np.zeros(num_experts, dtype=np.int64)
        self._last: dict[int, int] = {}  # resident expert -> tick of last use, in insertion order
        self.tick = 0

    def assign(self, experts: np.ndarray) -> tuple[int, list[tuple[int, int]]]:
        self.tick += 1
        keys = experts.tolist()
        hits = sum(1 for e in keys if self.lut[e] >= 0)
        over = len(self._last) + (len(keys) - hits) - self.n_slots
        if over > 0:
            pinned = set(keys)
            cands = sorted(((int(self.count[e]) * self.WEIGHT + t, t, e) for e, t in self._last.items()
                            if e not in pinned), key=lambda c: (c[0], c[1]))
            for _, _, e in cands[:over]:
                self._free.append(int(self.lut[e]))
                self.lut[e] = -1
                del self._last[e]
                self._lru.pop(e, None)
                self.evictions += 1
        filled = []
        for e in keys:
            self.count[e] += 1
            if self.lut[e] < 0:
                slot = self._free.pop()
                self.lut[e] = slot
                self._lru[e] = slot
                filled.append((e, slot))
            self._last[e] = self.tick
        return hits, filled

    def forget(self, experts: list[int]) -> None:
        for e in experts:
            self._last.pop(e, None)
        super().forget(experts)


class PolicySlots(LayerSlots):
    """A slot table whose decisions are a simulator policy's (daemon/tools/policy.py, pure Python):
    the policy object itself is the bookkeeping, so the engine keeps exactly the experts the
    simulator keeps; this class only maps experts to slots (the policy's evicted keys free theirs,
    its misses take free ones). A visit costs the policy's visit plus O(k) here."""

    def __init__(self, n_slots: int, num_experts: int, policy: Policy):
        super().__init__(n_slots, num_experts)
        self.policy = policy
        self._gone = policy.log_evictions()

    def assign(self, experts: np.ndarray) -> tuple[int, list[tuple[int, int]]]:
        keys = experts.tolist()
        hits = self.policy.visit(keys, 0)
        lut, free = self.lut, self._free
        gone = self._gone
        if gone:  # never a key of this visit: the policies pin them
            for e in gone:
                free.append(int(lut[e]))
                lut[e] = -1
            self.evictions += len(gone)
            gone.clear()
        filled = []
        if hits < len(keys):
            for e in keys:
                if lut[e] < 0:
                    slot = free.pop()
                    lut[e] = slot
                    filled.append((e, slot))
        return hits, filled

    def forget(self, experts: list[int]) -> None:
        for e in experts:
            if self.lut[e] >= 0:
                self.policy.discard(e)
                self._free.append(int(self.lut[e]))
                self.lut[e] = -1

    @property
    def used(self) -> int:
        return self.n_slots - len(self._free)  # every slot not free holds an expert

    @property
    def full(self) -> bool:
        return self.used == len(self.lut)


class LFUDASlots(PolicySlots):
    """LFU with dynamic aging (`policy.LFUDA`): priority = uses since the expert entered + L at its
    last use, L = the priority of the last eviction. A lazy heap: O(k log n) a visit."""

    def __init__(self, n_slots: int, num_experts: int, **_):
        super().__init__(n_slots, num_experts, LFUDA(n_slots))


class DecayedLFUSlots(PolicySlots):
    """Decayed LFU (`policy.DecayedLFU`): use counts decayed 0.95 per visit of the layer (a token),
    lowest evicted; its log-space heat (`policy.decayed_use`) keeps a lazy heap: O(k log n) a visit."""

    def __init__(self, n_slots: int, num_experts: int, **_):
        super().__init__(n_slots, num_experts, DecayedLFU(n_slots))


class HotLRUSlots(PolicySlots):
    """A pinned hot set + LRU (`policy.HotLRU`): min(half the slots, slots - top-k) pinned to the
    layer's most-used experts, the rest an LRU. The hot set comes from `counts`, the warm start's
    saved use counts of the layer (daemon/engine/warmstart.py: the heat map the last runs saved);
    with none (no saved file, --no-warm-start, or a layer never counted), from the counts of the
    layer's first `HotLRU.WARMUP` visits of this run (a plain LRU of every slot until then). O(k) a
    visit (dict and set operations); the one-time choice sorts the layer's counts."""

    def __init__(self, n_slots: int, num_experts: int, top_k: int | None = None,
                 counts: np.ndarray | dict | None = None, **_):
        if isinstance(counts, np.ndarray):
            counts = {e: float(c) for e, c in enumerate(counts[:num_experts].tolist()) if c > 0} or None
        super().__init__(n_slots, num_experts, HotLRU(n_slots, counts, min(n_slots, top_k or 1)))

    def groups(self, experts: np.ndarray) -> list[np.ndarray]:
        """Groups whose experts outside the hot set fit the LRU part (the hot ones have their slots)."""
        cap = self.policy.lru.capacity
        if len(experts) <= cap:
            return [experts]
        hot = self.policy.hot or ()
        is_hot = np.fromiter((e in hot for e in experts.tolist()), dtype=bool, count=len(experts))
        cold = experts[~is_hot]
        if len(cold) <= cap:
            return [experts]
        resident = self.lut[cold] >= 0
        cold = np.concatenate([cold[resident], cold[~resident]])
        groups = [cold[i : i + cap] for i in range(0, len(cold), cap)]
        groups[0] = np.concatenate([experts[is_hot], groups[0]])
        return groups


EVICTIONS = {"lru": LayerSlots, "fwlru": FreqLayerSlots, "lfuda": LFUDASlots, "dlfu": DecayedLFUSlots,
             "hotlru": HotLRUSlots}


def make_slots(eviction: str, n_slots: int, num_experts: int, top_k: int | None = None,
               counts: np.ndarray | None = None) -> LayerSlots:
    """A layer's slot table under `eviction` (a key of EVICTIONS). `top_k` (the largest decode visit)
    and `counts` (the layer's saved use counts, the warm start's) are for `hotlru`'s hot set."""
    cls = EVICTIONS[eviction]
    if issubclass(cls, PolicySlots):
        return cls(n_slots, num_experts, top_k=top_k, counts=counts)
    return cls(n_slots, num_experts)
