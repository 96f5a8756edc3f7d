"""An offline simulator of expert-cache eviction policies over recorded routing traces.

Pure Python + numpy (no MLX): it replays a routing trace (which experts each MoE layer needed, in
call order) against a cache of a given size and counts hits and misses, so eviction policies and
pool layouts can be compared without running a model.

A trace is a JSON file (or the equivalent dict)::

    {"kind": "moed-trace", "model": "...", "top_k": 8,
     "num_experts": [128, 128, ...],                # per MoE layer
     "steps": [[0, [3, 17, 40, ...]], [1, [...]], ...]}  # (moe_layer, experts), in call order

Each entry of ``steps`` is one *visit*: a layer that needs all its listed experts resident at
once. The experts of the current visit are *pinned*: no policy evicts them while serving it, so
a visit always ends with all of its experts resident.

Policies (all share the `Policy` interface; keys are any hashables, `(layer, expert)` in spirit):

- `LRU`: least recently used, the engine's baseline (`cache.LayerSlots`).
- `LFU`: least frequently used (in-cache counts), ties broken by recency.
- `LFUDA`: LFU with dynamic aging: priority = count + L, L = the priority of the last eviction.
- `FreqLRU` (``fwlru``): frequency-weighted LRU, score = uses x 10 + last use (Flash-MoE's CUDA port).
- `DecayedLFU` (``dlfu``): use counts decayed 0.95 per token (the engine's heat map), lowest evicted.
- `HotLRU` (``hotlru``): half the slots pinned to the trace's most-used keys (offline), the rest LRU;
  with no counts given, to the most-used keys of its first visits (online, the engine without a heat map).
- `LeastStale` (``leaststale``): SpecMD's idea: evict keys of the layer that comes back last in the
  layer cycle (LRU within a layer); the same as LRU in per-layer pools.
- `Belady`: the optimal offline policy: evicts the resident key whose next use is farthest.

Layouts:

- ``per_layer``: each layer its own pool of ``round(fraction * num_experts)`` slots, at least the
  trace's ``top_k`` and the layer's largest visit, at most all its experts (the engine's layout).
- ``global``: one pool shared by all layers, as many slots as the per-layer pools together (the
  same memory), so at least the largest visit.

Command line: ``python -m moed.daemon.tools.policy TRACE.json [--fractions 0.1,0.25,0.5] [--out F.json]``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from itertools import pairwise
from pathlib import Path

import numpy as np

TRACE_KIND = "moed-trace"
POLICIES = ("lru", "lfu", "lfuda", "fwlru", "dlfu", "hotlru", "leaststale", "belady")
LAYOUTS = ("per_layer", "global")
NEVER = 1 << 62  # "next use" of a key that is never used again


# ---------------------------------------------------------------- traces


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def validate_trace(trace: dict) -> dict:
    """Check a trace dict; returns a normalised copy (plain ints, each visit's experts sorted).

    Raises ValueError naming what is wrong (and where).
    """
    if not isinstance(trace, dict):
        raise ValueError(f"trace must be a JSON object, got {type(trace).__name__}")  # noqa: TRY004
    if trace.get("kind") != TRACE_KIND:
        raise ValueError(f"trace kind must be {TRACE_KIND!r}, got {trace.get('kind')!r}")
    num_experts = trace.get("num_experts")
    if not isinstance(num_experts, list) or not num_experts:
        raise ValueError("trace num_experts must be a non-empty list (experts per MoE layer)")
    for i, n in enumerate(num_experts):
        if not _is_int(n) or n <= 0:
            raise ValueError(f"trace num_experts[{i}] must be a positive integer, got {n!r}")
    top_k = trace.get("top_k")
    if not _is_int(top_k) or top_k <= 0:
        raise ValueError(f"trace top_k must be a positive integer, got {top_k!r}")
    if top_k > min(num_experts):
        raise ValueError(f"trace top_k {top_k} exceeds the smallest layer's {min(num_experts)} experts")
    steps = trace.get("steps")
    if not isinstance(steps, list):
        raise ValueError("trace steps must be a list of [moe_layer, [experts...]] pairs")  # noqa: TRY004
    n_layers = len(num_experts)
    out_steps = []
    for i, step in enumerate(steps):
        if not isinstance(step, (list, tuple)) or len(step) != 2:
            raise ValueError(f"trace steps[{i}] must be a [moe_layer, [experts...]] pair, got {step!r}")
        layer, experts = step
        if not _is_int(layer) or not 0 <= layer < n_layers:
            raise ValueError(f"trace steps[{i}]: layer {layer!r} out of range [0, {n_layers})")
        if not isinstance(experts, (list, tuple)) or not experts:
            raise ValueError(f"trace steps[{i}]: experts must be a non-empty list, got {experts!r}")
        n = num_experts[layer]
        for e in experts:
            if not _is_int(e) or not 0 <= e < n:
                raise ValueError(f"trace steps[{i}]: expert {e!r} out of range [0, {n}) of layer {layer}")
        ex = sorted(int(e) for e in experts)
        if any(a == b for a, b in pairwise(ex)):
            raise ValueError(f"trace steps[{i}]: duplicate experts in {list(experts)!r}")
        out_steps.append([int(layer), ex])
    model = trace.get("model")
    if model is not None and not isinstance(model, str):
        raise ValueError(f"trace model must be a string, got {model!r}")
    return {**trace, "top_k": int(top_k), "num_experts": [int(n) for n in num_experts], "steps": out_steps}


def load_trace(path: str | Path) -> dict:
    """Read and validate a trace file (see `validate_trace`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    try:
        return validate_trace(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def random_trace(n_layers: int = 12, n_steps: int = 1000, top_k: int = 8, num_experts: int = 128,
                 skew: float = 1.0, seed: int = 0, model: str = "synthetic") -> dict:
    """A synthetic trace: each layer draws top_k distinct experts per step from a Zipf-like law.

    `skew` 0 is uniform; larger concentrates use on a few (per-layer shuffled) experts.
    """
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, num_experts + 1, dtype=np.float64)
    p = ranks ** -float(skew)
    p /= p.sum()
    perms = [rng.permutation(num_experts) for _ in range(n_layers)]
    steps = []
    for _ in range(n_steps):
        for layer in range(n_layers):
            picks = rng.choice(num_experts, size=top_k, replace=False, p=p)
            steps.append([layer, sorted(perms[layer][picks].tolist())])
    return {"kind": TRACE_KIND, "model": model, "top_k": top_k,
            "num_experts": [num_experts] * n_layers, "steps": steps}


# ---------------------------------------------------------------- policies


class Policy:
    """A cache of `capacity` keys under some eviction policy.

    `visit(keys, t)` serves one visit: every key of `keys` (unique) is made resident at once; keys
    of the visit are pinned (never evicted while it is served). Returns the number of hits.
    `access(key, t)` is a visit of a single key, returning whether it hit. `t` is the visit's
    index in the trace (non-decreasing); only `Belady` needs it.
    """

    name = "policy"
    evicted: list | None = None  # the evicted keys, in order, when `log_evictions` was called

    def __init__(self, capacity: int):
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = int(capacity)
        self.evictions = 0

    def log_evictions(self) -> list:
        """From now on append every evicted key to the returned list (the engine's slot tables,
        daemon/engine/slots.PolicySlots, drain it after each visit to free those keys' slots)."""
        self.evicted = []
        return self.evicted

    def discard(self, key: Hashable) -> None:  # pragma: no cover - abstract
        """Drop `key` if resident, not as an eviction (the engine's failed read)."""
        raise NotImplementedError

    def visit(self, keys: Sequence[Hashable], t: int) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def access(self, key: Hashable, t: int) -> bool:
        return self.visit((key,), t) == 1

    def _check(self, keys: Sequence[Hashable]) -> None:
        if len(keys) > self.capacity:
            raise ValueError(f"a visit of {len(keys)} keys does not fit {self.capacity} slots")

    def resident(self) -> set:  # pragma: no cover - abstract
        raise NotImplementedError

    def __contains__(self, key: Hashable) -> bool:
        return key in self.resident()

    def __len__(self) -> int:
        return len(self.resident())


class _Held(Policy):
    """A policy whose residents are the keys of one dict, `self._held`."""

    _held: dict

    def _sizes(self, keys) -> tuple[int, int]:
        """(hits, keys past capacity once the misses are in) of a visit; one that cannot fit is refused."""
        if len(keys) > self.capacity:
            self._check(keys)
        held = self._held
        hits = sum(1 for k in keys if k in held)
        return hits, len(held) + len(keys) - hits - self.capacity

    def discard(self, key):
        self._held.pop(key, None)

    def resident(self):
        return set(self._held)

    def __contains__(self, key):
        return key in self._held

    def __len__(self):
        return len(self._held)


class LRU(_Held):
    """Least recently used; mirrors `cache.LayerSlots.assign` (hits touched first, then misses)."""

    name = "lru"

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self._od: OrderedDict = OrderedDict()
        self._held = self._od

    def visit(self, keys, t):
        if len(keys) > self.capacity:
            self._check(keys)
        od = self._od
        hits = 0
        misses = []
        for k in keys:
            if k in od:
                od.move_to_end(k)
                hits += 1
            else:
                misses.append(k)
        if misses:
            cap = self.capacity
            for k in misses:
                if len(od) >= cap:  # the oldest is never pinned: the visit's hits were just moved to the end
                    old = od.popitem(last=False)[0]
                    self.evictions += 1
                    if self.evicted is not None:
                        self.evicted.append(old)
                od[k] = None
        return hits


class LFU(_Held):
    """Least frequently used (counts since the key entered the cache), ties by recency.

    A lazy min-heap of (priority, tick, key); an entry is live while its tick is the key's last.
    """

    name = "lfu"
    aging = False

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self._count: dict = {}  # resident key -> uses since it entered
        self._held = self._count
        self._tick_of: dict = {}  # resident key -> tick of its last use (its live heap entry)
        self._heap: list = []
        self._tick = 0
        self.age = 0  # LFUDA's L: the priority of the last evicted key (LFU: always 0)

    def visit(self, keys, t):
        if len(keys) > self.capacity:
            self._check(keys)
        count, tick_of, heap = self._count, self._tick_of, self._heap
        push = heapq.heappush
        hits = 0
        misses = None
        age = self.age
        for k in keys:
            c = count.get(k)
            if c is None:
                if misses is None:
                    misses = [k]
                else:
                    misses.append(k)
                continue
            hits += 1
            c += 1
            count[k] = c
            self._tick += 1
            tick_of[k] = self._tick
            push(heap, (c + age, self._tick, k))
        if misses is not None:
            for k in misses:
                if len(count) >= self.capacity:
                    self._evict(keys)
                count[k] = 1
                self._tick += 1
                tick_of[k] = self._tick
                push(heap, (1 + self.age, self._tick, k))
            if len(heap) > 4 * self.capacity + 1024:
                self._compact()
        return hits

    def _evict(self, pinned) -> None:
        heap, tick_of = self._heap, self._tick_of
        pop = heapq.heappop
        held = []
        pinned = set(pinned)
        while True:
            entry = pop(heap)  # never empty: a live entry exists for every resident key
            prio, tick, k = entry
            if tick_of.get(k) != tick:
                continue  # stale
            if k in pinned:
                held.append(entry)
                continue
            del tick_of[k]
            del self._count[k]
            self.evictions += 1
            if self.evicted is not None:
                self.evicted.append(k)
            if self.aging:
                self.age = prio
            break
        for entry in held:
            heapq.heappush(heap, entry)

    def discard(self, key):
        if self._count.pop(key, None) is not None:
            del self._tick_of[key]  # its heap entries are stale now

    def _compact(self) -> None:
        tick_of = self._tick_of
        self._heap = [e for e in self._heap if tick_of.get(e[2]) == e[1]]
        heapq.heapify(self._heap)


class LFUDA(LFU):
    """LFU with dynamic aging: a key's priority is its count plus L at its last use, where L is
    the priority of the last evicted key, so once-hot keys age out."""

    name = "lfuda"
    aging = True


class Future:
    """Next-use times of every access of a sequence of visits, for `Belady`.

    `next_use[t][i]` is the index of the next visit after `t` that needs `visits[t][i]`
    (`NEVER` if none). Built with one stable argsort over all accesses: O(n log n).
    """

    def __init__(self, visits: Sequence[Sequence[Hashable]]):
        self.visits = [tuple(v) for v in visits]
        lengths = np.fromiter((len(v) for v in self.visits), dtype=np.int64, count=len(self.visits))
        n = int(lengths.sum())
        ids: dict = {}
        flat = np.fromiter((ids.setdefault(k, len(ids)) for v in self.visits for k in v), dtype=np.int64, count=n)
        times = np.repeat(np.arange(len(self.visits), dtype=np.int64), lengths)
        order = np.argsort(flat, kind="stable")  # by key, then by time
        nxt = np.full(n, NEVER, dtype=np.int64)
        same = flat[order[1:]] == flat[order[:-1]]
        nxt[order[:-1][same]] = times[order[1:][same]]
        flat_next = nxt.tolist()
        bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
        self.next_use = [flat_next[a:b] for a, b in pairwise(bounds)]

    def __len__(self):
        return len(self.visits)


class Belady(_Held):
    """Belady's MIN: evict the resident key whose next use is farthest in the future.

    Needs the whole sequence of visits up front (a `Future`, or the visits themselves); `visit`
    must then be called with exactly `visits[t]` for each `t` it serves (a subsequence of the
    visits may be served, e.g. one layer's, when the keys of different pools are disjoint).
    """

    name = "belady"

    def __init__(self, capacity: int, future: Future | Sequence[Sequence[Hashable]]):
        super().__init__(capacity)
        self.future = future if isinstance(future, Future) else Future(future)
        self._next: dict = {}  # resident key -> its next use
        self._held = self._next
        self._heap: list = []  # (-next use, seq, key), lazy
        self._seq = 0

    def visit(self, keys, t):
        fut = self.future
        if not 0 <= t < len(fut.visits) or tuple(keys) != fut.visits[t]:
            raise ValueError(f"Belady: visit {t} is not the one it was given in advance")
        if len(keys) > self.capacity:
            self._check(keys)
        nxt = self._next
        hits = 0
        n_miss = 0
        for k in keys:
            if k in nxt:
                hits += 1
            else:
                n_miss += 1
        if n_miss:
            over = len(nxt) + n_miss - self.capacity
            if over > 0:
                self._evict(over, keys)
        push = heapq.heappush
        heap = self._heap
        seq = self._seq
        for k, nu in zip(keys, fut.next_use[t]):
            nxt[k] = nu
            seq += 1
            push(heap, (-nu, seq, k))
        self._seq = seq
        if len(heap) > 4 * self.capacity + 1024:
            self._heap = [e for e in heap if nxt.get(e[2]) == -e[0]]
            heapq.heapify(self._heap)
        return hits

    def _evict(self, n: int, pinned) -> None:
        heap, nxt = self._heap, self._next
        pop = heapq.heappop
        pinned = set(pinned)
        held = []
        while n:
            entry = pop(heap)
            k = entry[2]
            if nxt.get(k) != -entry[0]:
                continue  # stale
            if k in pinned:  # its next use is now; only a key given out of order gets here
                held.append(entry)
                continue
            del nxt[k]
            self.evictions += 1
            n -= 1
        for entry in held:
            heapq.heappush(heap, entry)


class _Scored(_Held):
    """Evicts the resident key of lowest `score` (a linear scan: pools are small); the visit's keys
    are pinned. `tick` is this pool's own clock (one per visit: tokens for a per-layer pool)."""

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self._res: dict = {}  # key -> last use (tick)
        self._held = self._res
        self.tick = 0

    def score(self, key, last: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def touch(self, key) -> None:
        """Called for every key of every visit, hit or miss (counts and the like)."""

    def visit(self, keys, t):
        hits, over = self._sizes(keys)
        self.tick += 1
        res = self._res
        if over > 0:
            pinned = set(keys)
            cands = sorted(((self.score(k, last), last, k) for k, last in res.items() if k not in pinned),
                           key=lambda c: (c[0], c[1]))
            for _, _, k in cands[:over]:
                del res[k]
                self.evictions += 1
        for k in keys:
            self.touch(k)
            res[k] = self.tick
        return hits


class FreqLRU(_Scored):
    """Frequency-weighted LRU (Flash-MoE's CUDA port): score = uses x 10 + last use, lowest evicted.

    Uses are counted over the whole run (they survive eviction); last use is the pool's clock.
    """

    name = "fwlru"
    WEIGHT = 10

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.count: dict = {}

    def touch(self, key):
        self.count[key] = self.count.get(key, 0) + 1

    def score(self, key, last):
        return self.count.get(key, 0) * self.WEIGHT + last


def decayed_use(level: float | None, tick: int, rate: float) -> float:
    """A decayed use count after one more use at `tick`, in log space (`DecayedLFU`'s heat).

    The count c decays by exp(-rate) per tick; it is kept as level = ln(c at tick u) + u x rate
    (u: its last use), which does not change while the key is not used: the order of the keys by
    level is their order by decayed count at any later tick, so a heap keeps it. `level` None: never
    used. The one definition of the score, for the simulator and the engine's slot table alike.
    """
    now = tick * rate
    return (0.0 if level is None else math.log1p(math.exp(level - now))) + now


class DecayedLFU(_Held):
    """Decayed LFU: each key's use count decays by `DECAY` per tick of the pool (the engine's Heat:
    half-life ~14 tokens); the lowest is evicted, ties by recency, then by time of entry. Counts
    survive eviction. A lazy min-heap of (level, last use, entry, key) (see `decayed_use`): a visit
    costs O(k log n), no scan of the pool."""

    name = "dlfu"
    DECAY = 0.95

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.rate = -math.log(self.DECAY)
        self.level: dict = {}  # every key used so far -> its heat (decayed_use)
        self._res: dict = {}  # resident key -> its live heap entry (level, last use, entry, key)
        self._held = self._res
        self._heap: list = []
        self.tick = 0
        self._seq = 0  # entries into the pool, for ties

    def visit(self, keys, t):
        hits, over = self._sizes(keys)
        self.tick += 1
        res = self._res
        if over > 0:
            self._evict(over, keys)
        tick, rate, level, heap = self.tick, self.rate, self.level, self._heap
        for k in keys:
            lv = level[k] = decayed_use(level.get(k), tick, rate)
            old = res.get(k)
            if old is None:
                self._seq += 1
                entry = (lv, tick, self._seq, k)
            else:
                entry = (lv, tick, old[2], k)
            res[k] = entry
            heapq.heappush(heap, entry)
        if len(heap) > 4 * self.capacity + 1024:
            self._heap = [e for e in heap if res.get(e[3]) is e]
            heapq.heapify(self._heap)
        return hits

    def _evict(self, n: int, pinned) -> None:
        heap, res = self._heap, self._res
        pinned = set(pinned)
        held = []
        while n:
            entry = heapq.heappop(heap)  # never empty: every resident key has its live entry
            k = entry[3]
            if res.get(k) is not entry:
                continue  # stale
            if k in pinned:
                held.append(entry)
                continue
            del res[k]
            self.evictions += 1
            if self.evicted is not None:
                self.evicted.append(k)
            n -= 1
        for entry in held:
            heapq.heappush(heap, entry)


def hot_set(counts: dict, n: int) -> set:
    """The `n` most-used keys of `counts` (ties: the earlier key of the dict), `HotLRU`'s hot set."""
    return set(sorted(counts, key=lambda k: -counts[k])[:n])


class HotLRU(Policy):
    """A pinned hot set + LRU: the `SHARE` of the slots (at most capacity - `largest`, so the LRU part
    holds any visit) pinned to the most-used keys, the rest an LRU; hot keys always hit after their
    first load.

    `counts` given: the hot set is its most-used keys from the start (the simulator: the whole
    trace's counts, an offline choice like slotstream's "best fixed hot set"; the engine: the warm
    start's saved counts). `counts` None (online): a plain LRU of every slot for the first `warmup`
    visits, counting uses; at the first visit after those whose keys outside the hot set fit the LRU
    part, the hot set is the most-used keys so far, kept for good: the resident ones move to it and
    the LRU part shrinks to its size, evicting its oldest keys (never one of that visit).
    """

    name = "hotlru"
    SHARE = 0.5
    WARMUP = 32  # online: visits counted before the hot set is chosen

    def __init__(self, capacity: int, counts: dict | None, largest: int, warmup: int = WARMUP):
        super().__init__(capacity)
        self.n_hot = max(0, min(int(capacity * self.SHARE), capacity - largest))
        self.hot: set | None = None if counts is None else hot_set(counts, self.n_hot)
        self.seen: dict = {}  # online, before the choice: uses so far
        self.warmup, self.visits = warmup, 0
        self.loaded: set = set()
        self.lru = LRU(capacity if counts is None else capacity - self.n_hot)

    def log_evictions(self):
        self.evicted = self.lru.evicted = []
        return self.evicted

    def visit(self, keys, t):
        if self.hot is None:
            if self.visits >= self.warmup:
                self._choose(keys)
            if self.hot is None:
                self.visits += 1
                seen = self.seen
                for k in keys:
                    seen[k] = seen.get(k, 0) + 1
                hits = self.lru.visit(keys, t)
                self.evictions = self.lru.evictions
                return hits
        hits = 0
        cold = []
        for k in keys:
            if k in self.hot:
                hits += k in self.loaded
                self.loaded.add(k)
            else:
                cold.append(k)
        if cold:
            hits += self.lru.visit(cold, t)
        self.evictions = self.lru.evictions
        return hits

    def _choose(self, keys) -> None:
        hot = hot_set(self.seen, self.n_hot)
        cap = self.capacity - self.n_hot
        if sum(1 for k in keys if k not in hot) > cap:
            return  # this visit's cold keys would not fit the LRU part: try at the next one
        self.hot, self.seen = hot, {}
        lru, od = self.lru, self.lru._od
        for k in hot:
            if k in od:
                del od[k]
                self.loaded.add(k)
        lru.capacity = cap
        over = len(od) - cap
        if over > 0:
            pinned = set(keys)
            for k in [k for k in od if k not in pinned][:over]:  # oldest first
                del od[k]
                lru.evictions += 1
                if lru.evicted is not None:
                    lru.evicted.append(k)

    def discard(self, key):
        self.loaded.discard(key)
        self.lru.discard(key)

    def resident(self):
        return self.loaded | self.lru.resident()


class LeastStale(_Scored):
    """SpecMD's Least-Stale, as read here: layers run in order, so a key of the layer just computed
    is the stalest (its next use is a whole forward pass away) and a key of the next layers is fresh.
    Evicts the key whose layer comes back last in the layer cycle, ties by recency (LRU). In a
    per-layer pool every key shares the layer: it is LRU there; it differs in a global pool."""

    name = "leaststale"

    def __init__(self, capacity: int, layer_of, n_layers: int):
        super().__init__(capacity)
        self.layer_of, self.n_layers = layer_of, n_layers
        self.current = 0

    def visit(self, keys, t):
        self.current = self.layer_of(keys[0]) if keys else self.current
        return super().visit(keys, t)

    def score(self, key, last):
        # layers after the current one come back soonest: evict the one that returns last
        until = (self.layer_of(key) - self.current - 1) % self.n_layers
        return -until * 1e9 + last


POLICY_CLASSES = {"lru": LRU, "lfu": LFU, "lfuda": LFUDA, "fwlru": FreqLRU, "dlfu": DecayedLFU,
                  "hotlru": HotLRU, "leaststale": LeastStale, "belady": Belady}


# ---------------------------------------------------------------- simulation


class _Prepared:
    """A validated trace with int-coded keys (offset[layer] + expert), reused across a sweep."""

    def __init__(self, trace: dict | str | Path):
        if isinstance(trace, (str, Path)):
            trace = load_trace(trace)
        elif not isinstance(trace, _Prepared):
            trace = validate_trace(trace)
        self.trace = trace
        self.num_experts = trace["num_experts"]
        self.top_k = trace["top_k"]
        self.n_layers = len(self.num_experts)
        offsets = np.concatenate([[0], np.cumsum(self.num_experts)]).tolist()
        self.layers = [layer for layer, _ in trace["steps"]]
        self.visits = [tuple(offsets[layer] + e for e in ex) for layer, ex in trace["steps"]]
        self.largest = [0] * self.n_layers
        for layer, keys in zip(self.layers, self.visits):
            self.largest[layer] = max(self.largest[layer], len(keys))
        self._future: Future | None = None
        self.offsets = offsets
        self._counts: dict | None = None

    @property
    def counts(self) -> dict:
        """Uses of every key over the whole trace (the offline hot set's choice)."""
        if self._counts is None:
            c: dict = {}
            for keys in self.visits:
                for k in keys:
                    c[k] = c.get(k, 0) + 1
            self._counts = c
        return self._counts

    def layer_of(self, key: int) -> int:
        return int(np.searchsorted(self.offsets, key, side="right") - 1)

    @property
    def future(self) -> Future:
        if self._future is None:
            self._future = Future(self.visits)
        return self._future

    def slots(self, fraction: float) -> list[int]:
        """Per-layer slots at a fraction: like `model.slots_per_layer`, and never below the largest visit."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        return [min(n, max(round(fraction * n), self.top_k, big))
                for n, big in zip(self.num_experts, self.largest)]


def _make(policy: str, capacity: int, prep: _Prepared, layer: int | None = None) -> Policy:
    """A pool of `capacity` for `layer`'s keys (None: every layer's, the global layout)."""
    if policy == "belady":
        return Belady(capacity, prep.future)
    if policy == "hotlru":
        counts = prep.counts if layer is None else {k: c for k, c in prep.counts.items() if prep.layer_of(k) == layer}
        return HotLRU(capacity, counts, max(prep.largest) if layer is None else prep.largest[layer])
    if policy == "leaststale":
        return LeastStale(capacity, prep.layer_of, prep.n_layers)
    return POLICY_CLASSES[policy](capacity)


def _run(prep: _Prepared, policy: str, layout: str, fraction: float) -> dict:
    policy = policy.lower()
    if policy not in POLICY_CLASSES:
        raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    slots = prep.slots(fraction)
    if layout == "per_layer":
        pools = [_make(policy, s, prep, layer) for layer, s in enumerate(slots)]
    else:
        pools = [_make(policy, sum(slots), prep)] * prep.n_layers
    L = prep.n_layers
    layer_hits, layer_total = [0] * L, [0] * L
    t0 = time.perf_counter()
    for t, (layer, keys) in enumerate(zip(prep.layers, prep.visits)):
        layer_hits[layer] += pools[layer].visit(keys, t)
        layer_total[layer] += len(keys)
    seconds = time.perf_counter() - t0
    hits, total = sum(layer_hits), sum(layer_total)
    return {
        "policy": policy, "layout": layout, "fraction": fraction,
        "slots": sum(slots), "slots_per_layer": slots if layout == "per_layer" else None,
        "hits": hits, "misses": total - hits, "hit_rate": hits / total if total else 0.0,
        "layer_hit_rates": [h / n if n else None for h, n in zip(layer_hits, layer_total)],
        "layer_hits": layer_hits, "layer_misses": [n - h for h, n in zip(layer_hits, layer_total)],
        "evictions": sum(p.evictions for p in {id(p): p for p in pools}.values()),
        "seconds": seconds,
    }


def simulate(trace: dict | str | Path, policy: str, layout: str, fraction: float) -> dict:
    """Replay `trace` (a dict, or a path to a trace file) under one policy, layout and fraction.

    Returns hits, misses, hit_rate, layer_hit_rates (None for a layer never visited), layer_hits,
    layer_misses, slots (total), slots_per_layer (per_layer layout), evictions and seconds.
    """
    return _run(_Prepared(trace), policy, layout, fraction)


def sweep(trace: dict | str | Path, fractions: Iterable[float] = (0.1, 0.25, 0.5),
          policies: Iterable[str] = POLICIES, layouts: Iterable[str] = LAYOUTS) -> list[dict]:
    """`simulate` over every (fraction, layout, policy); one row each, in that order.

    Each row also carries `belady_hit_rate` (Belady, same layout and fraction), `gap_to_belady`
    (that minus the row's hit rate, >= 0) and `gap_to_best` (the best Belady of any layout at the
    fraction minus the row's hit rate). Belady is run for the gaps even when not listed.
    """
    prep = _Prepared(trace)
    fractions, policies, layouts = list(fractions), [p.lower() for p in policies], list(layouts)
    for p in policies:
        if p not in POLICY_CLASSES:
            raise ValueError(f"unknown policy {p!r}; choose from {', '.join(POLICIES)}")
    for lay in layouts:
        if lay not in LAYOUTS:
            raise ValueError(f"unknown layout {lay!r}; choose from {', '.join(LAYOUTS)}")
    rows = []
    for f in fractions:
        opt = {lay: _run(prep, "belady", lay, f) for lay in layouts}
        best = max(r["hit_rate"] for r in opt.values())
        for lay in layouts:
            for p in policies:
                r = opt[lay] if p == "belady" else _run(prep, p, lay, f)
                r = dict(r)
                r["belady_hit_rate"] = opt[lay]["hit_rate"]
                r["gap_to_belady"] = opt[lay]["hit_rate"] - r["hit_rate"]
                r["gap_to_best"] = best - r["hit_rate"]
                rows.append(r)
    return rows


def best_online(rows: list[dict], fraction: float) -> tuple[str, str]:
    """The (policy, layout) of the highest hit rate among the non-Belady rows at `fraction`.

    Ties go to the earlier row. Raises ValueError if there is no such row.
    """
    cands = [r for r in rows if r["policy"] != "belady" and math.isclose(r["fraction"], fraction)]
    if not cands:
        raise ValueError(f"no online-policy rows at fraction {fraction}")
    best = max(cands, key=lambda r: r["hit_rate"])  # max keeps the first of equals
    return best["policy"], best["layout"]


# ---------------------------------------------------------------- command line


def _floats(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {s!r}") from None


def _names(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moed.daemon.tools.policy",
                                 description="Replay a routing trace under expert-cache eviction policies.")
    ap.add_argument("trace", help="a moed-trace JSON file")
    ap.add_argument("--fractions", type=_floats, default=[0.1, 0.25, 0.5],
                    help="cache fractions, comma-separated (default 0.1,0.25,0.5)")
    ap.add_argument("--policies", type=_names, default=list(POLICIES), help="default: " + ",".join(POLICIES))
    ap.add_argument("--layouts", type=_names, default=list(LAYOUTS), help="default: " + ",".join(LAYOUTS))
    ap.add_argument("--out", help="write the rows to this JSON file")
    a = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    err = Console(stderr=True)
    try:
        trace = load_trace(a.trace)
        t0 = time.perf_counter()
        rows = sweep(trace, a.fractions, a.policies, a.layouts)
        elapsed = time.perf_counter() - t0
    except (OSError, ValueError) as e:
        err.print(f"[red]error:[/red] {e}")
        return 2

    n_acc = sum(len(ex) for _, ex in trace["steps"])
    t = Table(title=f"cache policies: {trace.get('model') or Path(a.trace).name}, "
                    f"{len(trace['num_experts'])} MoE layers, {len(trace['steps'])} visits, {n_acc} accesses, "
                    f"top-k {trace['top_k']}")
    for col in ("fraction", "layout", "policy", "slots"):
        t.add_column(col, justify="right" if col in ("fraction", "slots") else "left")
    for col in ("hit rate", "misses", "gap to Belady", "gap to best", "worst layer"):
        t.add_column(col, justify="right")
    for f in a.fractions:
        best = None
        try:
            best = best_online(rows, f)
        except ValueError:
            pass
        for r in rows:
            if not math.isclose(r["fraction"], f):
                continue
            rates = [x for x in r["layer_hit_rates"] if x is not None]
            mark = (r["policy"], r["layout"]) == best
            style = "bold green" if mark else ("dim" if r["policy"] == "belady" else None)
            t.add_row(f"{f:g}", r["layout"], r["policy"] + (" *" if mark else ""), str(r["slots"]),
                      f"{r['hit_rate']:.2%}", str(r["misses"]), f"{r['gap_to_belady']:.2%}",
                      f"{r['gap_to_best']:.2%}", f"{min(rates):.2%}" if rates else "-", style=style)
        t.add_section()
    console = Console(width=170)
    console.print(t)
    console.print(f"* best online policy at each fraction; swept {len(rows)} rows in {elapsed:.2f}s")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1) + "\n")
        console.print(f"rows written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
