"""The paged expert layer: mlx-lm's SwitchGLU/SwitchMLP computing over a bounded slot pool.

Each stacked expert tensor of a layer (e.g. `gate_proj.weight`, shape (num_experts, ...)) is
replaced by a preallocated pool of shape (n_slots, ...). The original mlx-lm module still does
the math (`gather_qmm` and friends); it just receives slot indices instead of expert indices.
Missed experts are read by the I/O workers into shared memory and copied into their slots.
With lookahead, a decode step's layer also applies the next MoE layer's router to its own input
and starts reading that layer's predicted misses right behind its own (the fetcher keeps both in
flight); the next layer settles that read before anything else.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from moed.daemon.engine.index import FLOATS, ExpertLayer, ExpertTensor
from moed.daemon.engine.slots import CacheStats, make_slots

MX_DTYPES = {
    "F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16, "U32": mx.uint32,
    "U8": mx.uint8, "I8": mx.int8, "U16": mx.uint16, "I32": mx.int32,
}
HEAT_DECAY = 0.95


class Reader(Protocol):
    """The fetcher's interface: start reading byte ranges, then wait for views of them."""

    files: list[str]  # what range file indexes name

    def submit(self, ranges: Sequence[tuple[int, int, int]]) -> object: ...

    def wait(self, ticket: object) -> list[memoryview]: ...


@dataclass
class Pending:
    """Reads in flight for one layer's missed experts."""

    layer: int
    filled: list[tuple[int, int]]  # (expert, slot)
    ranges: list[tuple[int, int, int]]
    ticket: object
    t0: float


class TensorPool:
    """The slots of one stacked expert tensor, written in place from host memory.

    Args:
        tensor: the on-disk tensor this pool caches experts of.
        n_slots: number of slots.
        cast: float dtype to convert floating tensors to as they are paged in (None keeps them).
    """

    def __init__(self, tensor: ExpertTensor, n_slots: int, cast: mx.Dtype | None = None):
        self.src = tensor.info.dtype
        dtype = MX_DTYPES[self.src]
        if cast is not None and self.src in FLOATS:
            dtype = cast
        # numpy has no bfloat16: store bf16 as uint16 and hand MLX a bf16 view of the same buffer
        storage = mx.uint16 if dtype == mx.bfloat16 else dtype
        self._raw = mx.zeros((n_slots, *tensor.expert_shape), dtype=storage)
        mx.eval(self._raw)
        self.array = self._raw if storage == dtype else self._raw.view(dtype)
        mx.eval(self.array)
        self._host = np.asarray(self._raw).reshape(n_slots, -1)  # shares the MLX buffer
        self._convert = dtype != MX_DTYPES[self.src]
        if self._convert and dtype != mx.float32:
            raise ValueError(f"cannot cast {self.src} experts to {dtype}; only float32 is supported")

    def write(self, slot: int, data: memoryview) -> None:
        if not self._convert:
            self._host[slot].view(np.uint8)[:] = np.frombuffer(data, dtype=np.uint8)
        elif self.src == "BF16":  # bf16 -> f32 is a 16-bit shift
            u16 = np.frombuffer(data, dtype=np.uint16)
            self._host[slot].view(np.uint32)[:] = u16.astype(np.uint32) << 16
        else:  # F16 -> F32
            self._host[slot][:] = np.frombuffer(data, dtype=np.float16)


class Observer(Protocol):
    """Told of the layer visits whose routing reached the host (see ExpertStore.observe).

    `every_visit` True (a recording, e.g. `moed trace`): fully resident layers sync their routing
    too, so no visit is missed, and lookahead is off. False (e.g. Heat): the fast path stays.
    """

    every_visit: bool

    def visit(self, layer: int, experts: np.ndarray, decode: bool) -> None:
        """`experts`: the visit's distinct experts; `decode`: one token per sequence (a decode step)."""


class Heat:
    """An observer: recent use per (layer, expert), decayed once per model step (at layer 0;
    half-life ~14 steps), and `counts`, every use of the run (what a warm start fills the cache
    with next time: daemon/engine/warmstart.py). Fully resident layers take the fast path and are
    not counted.

    Args:
        num_experts: experts of each MoE layer.
    """

    every_visit = False

    def __init__(self, num_experts: Sequence[int]):
        self.values = np.zeros((len(num_experts), max(num_experts)), dtype=np.float32)
        self.counts = np.zeros_like(self.values, dtype=np.float64)

    def visit(self, layer: int, experts: np.ndarray, decode: bool) -> None:
        if layer == 0:
            self.values *= HEAT_DECAY
        self.values[layer, experts] += 1
        self.counts[layer, experts] += 1


class Visit:
    """One layer visit in progress, returned by `ExpertStore.load` (one per layer, reused).

    Right away: `slots` (each (token, choice) pair's slot, shaped like the routing; -1 where its
    expert is not resident yet), `ready` (the pairs whose slot is filled), `all_ready`, and
    `groups` (None, or the experts split into groups that fit the slots: then `by_group()`
    replaces `wait()`). Valid until `wait()`/`by_group()` or the layer's next `load`.
    """

    __slots__ = ("ahead", "all_ready", "experts", "groups", "idx", "layer", "ready", "slots", "store")

    def __init__(self, store: ExpertStore, layer: int):
        self.store, self.layer = store, layer
        self.idx = None

    def wait(self) -> np.ndarray:
        """Finish the visit and return every pair's slot (shaped like the routing).

        Accounts the visit, tells the observers, gives the missed experts slots and reads them,
        queues the lookahead read of the next layer's `ahead` experts right behind, and copies the
        misses into their slots once read. Call it after handing the ready pairs to MLX.
        """
        store, layer, idx = self.store, self.layer, self._take()
        experts = self.experts if self.experts is not None else np.unique(idx)
        store._notify(layer, idx, experts)
        pending = store._begin(layer, experts)  # hits keep their slots
        if self.ahead is not None:  # queued behind this layer's own read
            store._prefetch(layer + 1, np.unique(np.array(self.ahead)))
        store._finish(pending)
        return self.slots if self.all_ready else store.slots[layer].lut[idx]

    def by_group(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """More experts than slots (a long prompt on a small cache): one group at a time.

        Yields (rows, slots): the flattened pairs of one group and every pair's slot while that
        group is resident. The caller must evaluate the group's compute before asking for the next:
        the next group overwrites these slots. No lookahead read.
        """
        store, layer, idx = self.store, self.layer, self._take()
        store._notify(layer, idx, self.experts)
        flat = idx.reshape(-1)
        for group in self.groups:
            lut = store.ensure(layer, group)
            yield np.nonzero(np.isin(flat, group))[0], lut[flat]

    def _take(self) -> np.ndarray:
        idx, self.idx = self.idx, None
        if idx is None:
            raise RuntimeError(f"layer {self.layer}: visit already finished (one wait() per load())")
        return idx


class ExpertStore:
    """Slot pools, slot tables and the reader that fills them, for every MoE layer.

    The paging protocol, per visit of a MoE layer (PagedSwitch is the caller):

    1. `resident_lut(layer, pairs)`: when every expert of the layer is resident, the expert -> slot
       LUT on the device to index the routing with, with no host sync (the `pairs` count as hits);
       else None, and:
    2. the caller syncs the routing to the host (the layer's one sync) and calls
       `load(layer, idx, ahead=predicted)`, which only looks the pairs up and returns the layer's
       `Visit`: the `ready` pairs have their `slots` now;
    3. the caller hands the ready pairs to MLX (`mx.async_eval`), then calls `visit.wait()`, which
       does the bookkeeping and reads the missed experts meanwhile, with the next layer's
       lookahead read (`ahead`) queued behind, and returns every pair's slot. When `visit.groups`
       (more experts than slots), `visit.by_group()` instead.

    A lookahead read is settled (copied into its slots) by the next call of either kind, before
    anything else, so no slot is computed with before its bytes have landed. Observers
    (`observe`) are told of each visit that reached the host; with none, nothing is recorded.

    Args:
        layers: the index of each MoE layer's expert tensors.
        n_slots: slots per layer.
        reader: reads byte ranges (the fetcher fronting the I/O workers).
        cast: see TensorPool.
        eviction: the slot tables' policy (slots.EVICTIONS: "lru", "fwlru", "lfuda", "dlfu", "hotlru").
        top_k: the model's top-k (hotlru keeps at least that many slots outside its hot set).
        counts: the warm start's saved use counts, (layers, experts) (hotlru's hot set); None: none.
    """

    def __init__(self, layers: list[ExpertLayer], n_slots: list[int], reader: Reader,
                 cast: mx.Dtype | None = None, eviction: str = "lru", top_k: int | None = None,
                 counts: np.ndarray | None = None):
        self.layers = layers
        self.reader = reader
        self.pools = [[TensorPool(t, n, cast) for t in layer.tensors] for layer, n in zip(layers, n_slots)]
        self.slots = [make_slots(eviction, n, layer.num_experts, top_k, None if counts is None else counts[i])
                      for i, (layer, n) in enumerate(zip(layers, n_slots))]
        n = len(layers)
        self.stats = CacheStats(layer_hits=[0] * n, layer_misses=[0] * n)
        self.observers: list[Observer] = []
        self.recording = False  # an observer wants every visit: no fast path, no lookahead
        self._visits = [Visit(self, i) for i in range(n)]
        self._device_luts: list[mx.array | None] = [None] * n  # each full layer's LUT on the device
        self._ahead: Pending | None = None  # a lookahead read in flight
        self._predicted: tuple[int, set] = (-1, set())  # the last prefetch's layer and experts

    # ------------------------------------------------------------------ the protocol

    def resident_lut(self, layer: int, pairs: int) -> mx.array | None:
        """The fast path: the device LUT (expert -> slot) when every expert of `layer` is resident
        and no observer wants every visit, the visit's `pairs` counted as hits; else None."""
        self._settle()
        if self.recording or not self.slots[layer].full:
            return None
        lut = self._device_luts[layer]
        if lut is None:
            lut = self._device_luts[layer] = mx.array(self.slots[layer].lut)
        self.stats.hits += pairs
        self.stats.layer_hits[layer] += pairs
        return lut

    def load(self, layer: int, idx: np.ndarray, ahead=None) -> Visit:
        """Begin a visit: look up the slots of the (token, choice) pairs routed to experts `idx`.

        Args:
            layer: the MoE layer.
            idx: each pair's expert, on the host (the router's choice).
            ahead: the next MoE layer's predicted experts (an array), read behind this layer's
                misses by `Visit.wait()`; None: no lookahead.
        """
        self._settle()
        v = self._visits[layer]
        v.idx, v.ahead, v.experts, v.groups = idx, ahead, None, None
        v.slots = self.slots[layer].lut[idx]
        v.ready = v.slots >= 0
        v.all_ready = bool(v.ready.all())
        if not v.all_ready:
            v.experts = np.unique(idx)
            groups = self.slots[layer].groups(v.experts)
            if len(groups) > 1:
                v.groups = groups
        return v

    def observe(self, observer: Observer) -> Observer:
        """Tell `observer` of every visit from now on (returns it)."""
        self.observers.append(observer)
        self.recording = any(o.every_visit for o in self.observers)
        return observer

    def unobserve(self, observer: Observer) -> None:
        self.observers.remove(observer)
        self.recording = any(o.every_visit for o in self.observers)

    # ------------------------------------------------------------------ residency

    def ensure(self, layer: int, experts: np.ndarray) -> np.ndarray:
        """Make `experts` (unique, at most the layer's slots) resident; return the layer's LUT.
        Counts hits and misses; not a visit (observers are not told)."""
        self._finish(self._begin(layer, experts))
        return self.slots[layer].lut

    def warm(self, order: list[np.ndarray] | None = None, progress=None) -> int:
        """Fill every slot before serving (the experts in `order` per layer, else the first ones).

        Returns the bytes read; the serving statistics start from zero afterwards.
        """
        total = 0
        for layer, slots in enumerate(self.slots):
            want = order[layer] if order is not None else np.arange(self.layers[layer].num_experts)
            for group in slots.groups(np.asarray(want[: slots.n_slots], dtype=np.int64)):  # hotlru: may be 2
                self.ensure(layer, group)
            if progress:
                progress((layer + 1) / len(self.slots))
        total = self.stats.bytes_read
        n = len(self.slots)
        self.stats = CacheStats(layer_hits=[0] * n, layer_misses=[0] * n)
        return total

    def used_slots(self) -> list[int]:
        """Filled slots per layer."""
        return [s.used for s in self.slots]

    def resident(self, layer: int) -> np.ndarray:
        """The experts of `layer` that have a slot, ascending."""
        return np.flatnonzero(self.slots[layer].lut >= 0)

    def evictions(self) -> int:
        return sum(s.evictions for s in self.slots)

    def resident_bytes(self) -> int:
        """Bytes of the preallocated pools (the cache budget actually held)."""
        return sum(p.array.nbytes for pools in self.pools for p in pools)

    # ------------------------------------------------------------------ internals

    def _notify(self, layer: int, idx: np.ndarray, experts: np.ndarray) -> None:
        if self.observers:
            decode = idx.shape[-2] == 1
            for o in self.observers:
                o.visit(layer, experts, decode)

    def _assign(self, layer: int, experts: np.ndarray) -> tuple[int, list[tuple[int, int]]]:
        self._device_luts[layer] = None
        return self.slots[layer].assign(experts)

    def _prefetch(self, layer: int, experts: np.ndarray) -> None:
        """Lookahead: give `experts` of `layer` slots and start reading the missed ones now; the
        next call settles the read first. Not counted as hits or misses."""
        experts = experts[(experts >= 0) & (experts < self.layers[layer].num_experts)]
        if self._ahead is not None or len(self.slots[layer].groups(experts)) > 1:
            return
        _, filled = self._assign(layer, experts)
        self._predicted = (layer, {e for e, _ in filled})
        if filled:
            self._ahead = self._submit(layer, filled)
            self.stats.prefetched += len(filled)

    def _settle(self) -> None:
        """Copy a lookahead read into its slots (before any other read or compute). A failed one
        is dropped: it was a guess, and the layer's own read reports a real failure."""
        if self._ahead is not None:
            p, self._ahead = self._ahead, None
            try:
                self._finish(p)
            except Exception:  # _finish() has freed the slots
                self.stats.prefetched -= len(p.filled)

    def _submit(self, layer: int, filled: list[tuple[int, int]]) -> Pending:
        ranges = [r for e, _ in filled for r in self.layers[layer].ranges(e)]
        t0 = time.perf_counter()
        try:
            ticket = self.reader.submit(ranges)
        except BaseException:
            self.slots[layer].forget([e for e, _ in filled])
            raise
        return Pending(layer, filled, ranges, ticket, t0)

    def _begin(self, layer: int, experts: np.ndarray) -> Pending | None:
        """Give `experts` slots and start reading the missed ones; None when all are resident."""
        self._settle()
        if self._predicted[0] == layer:
            self.stats.prefetch_used += len(self._predicted[1].intersection(experts.tolist()))
            self._predicted = (-1, set())
        hits, filled = self._assign(layer, experts)
        self.stats.hits += hits
        self.stats.misses += len(filled)
        self.stats.layer_hits[layer] += hits
        self.stats.layer_misses[layer] += len(filled)
        if not filled:
            return None
        return self._submit(layer, filled)

    def _finish(self, p: Pending | None) -> None:
        """Wait for a begun read and copy the bytes into their slots."""
        if p is None:
            return
        try:
            views = self.reader.wait(p.ticket)
        except BaseException:
            self.slots[p.layer].forget([e for e, _ in p.filled])
            raise
        pools, layer = self.pools[p.layer], self.layers[p.layer]
        per = len(pools)
        if layer.crc32:  # a packed record is checked before it is used (a corrupt pack fails, never serves)
            t0 = time.perf_counter()
            bad = [e for i, (e, _) in enumerate(p.filled) if not layer.record_ok(e, views[i * per:(i + 1) * per])]
            self.stats.verify_seconds += time.perf_counter() - t0
            if bad:
                self.slots[p.layer].forget([e for e, _ in p.filled])
                path = self.reader.files[layer.tensors[0].info.file_idx]
                raise CorruptRecord(f"{path}: expert record(s) {', '.join(map(str, bad))} of {layer.path} fail "
                                    "their checksum: the pack is corrupt (rebuild it: moed pack MODEL)")
        for i, (_, slot) in enumerate(p.filled):
            for j, pool in enumerate(pools):
                pool.write(slot, views[i * per + j])
        self.stats.read_seconds += time.perf_counter() - p.t0
        self.stats.bytes_read += sum(r[2] for r in p.ranges)


class CorruptRecord(OSError):
    """A packed expert record whose bytes do not match the pack's checksum."""


class PagedSwitch(nn.Module):
    """Drop-in for SwitchGLU/SwitchMLP: same `(x, indices)` contract, experts paged from disk.

    Each call is one visit of the store's paging protocol (see ExpertStore).

    Args:
        inner: the mlx-lm switch module whose expert tensors were replaced by pools.
        store: the expert store holding the pools.
        layer: this layer's position in the store.
    """

    def __init__(self, inner: nn.Module, store: ExpertStore, layer: int):
        super().__init__()
        self.inner = inner
        self.store = store
        self.layer = layer
        self.lookahead = None  # the model's Lookahead, set by load_paged

    def set_lookahead(self, lookahead) -> None:
        # a plain attribute: not a child module of this one
        object.__setattr__(self, "lookahead", lookahead)

    def _predict(self, indices: mx.array) -> mx.array | None:
        """The next MoE layer's experts for these tokens, by its block's routing on this layer's
        block input (decode steps only)."""
        la = self.lookahead
        if la is None or la.off is not None or indices.shape[-2] != 1 or self.store.recording:
            return None
        predicted = la.predict(self.layer)
        if predicted is None:
            return None
        try:
            mx.eval(indices, predicted)  # still the layer's one host sync
        except Exception as e:  # the prediction's graph failed: never this layer's own routing
            la.disable(f"{type(e).__name__}: {e}")
            return None
        return predicted

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        lut = self.store.resident_lut(self.layer, indices.size)
        if lut is not None:  # all resident: no paging, no sync
            return self.inner(x, lut[indices])
        predicted = self._predict(indices)
        # np.array: the one host sync of this layer, the router's choice
        visit = self.store.load(self.layer, np.array(indices), ahead=predicted)
        if visit.all_ready:  # compute first: the bookkeeping runs while MLX does
            y = self.inner(x, mx.array(visit.slots))
            mx.async_eval(y)
            visit.wait()
            return y
        if visit.groups is not None:
            return self._by_group(x, visit)
        return self._overlapped(x, visit)

    def _rows(self, xf: mx.array, at: np.ndarray, rows: np.ndarray, k: int) -> mx.array:
        """The expert outputs of the (token, choice) pairs `rows` of the flattened pairs, whose
        experts sit in slots `at`."""
        return self.inner(xf[mx.array(rows // k)], mx.array(at[rows])[:, None])[:, 0]

    def _overlapped(self, x: mx.array, visit: Visit) -> mx.array:
        """Start computing the resident pairs, then read the missed experts meanwhile, with the
        next layer's lookahead read right behind (it runs while the misses compute)."""
        shape = visit.slots.shape
        k = shape[-1]
        xf = x.reshape(-1, x.shape[-1])
        ready = visit.ready.reshape(-1)
        hit_rows, miss_rows = np.flatnonzero(ready), np.flatnonzero(~ready)
        y_hit = None
        if len(hit_rows):
            y_hit = self._rows(xf, visit.slots.reshape(-1), hit_rows, k)
            mx.async_eval(y_hit)  # runs while the workers read the misses
        at = visit.wait()
        if y_hit is None:
            y = self.inner(x, mx.array(at))
        else:
            y = mx.concatenate([y_hit, self._rows(xf, at.reshape(-1), miss_rows, k)])
            y = y[mx.array(np.argsort(np.concatenate([hit_rows, miss_rows])))].reshape(*shape, -1)
        mx.async_eval(y)  # computes while the next layer's graph is built
        return y

    def _by_group(self, x: mx.array, visit: Visit) -> mx.array:
        """More experts than slots (a long prompt on a small cache): one group at a time.

        Each (token, choice) pair is computed exactly once, with its expert resident.
        """
        shape = visit.slots.shape
        xf = x.reshape(-1, x.shape[-1])
        pieces, order = [], []
        for rows, at in visit.by_group():
            y = self._rows(xf, at, rows, shape[-1])
            mx.eval(y)  # the next group overwrites these slots
            pieces.append(y)
            order.append(rows)
        inverse = np.argsort(np.concatenate(order))
        y = mx.concatenate(pieces)[mx.array(inverse)]
        return y.reshape(*shape, y.shape[-1])
