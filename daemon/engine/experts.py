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
from dataclasses import dataclass
from typing import Protocol, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from moed.daemon.engine.index import FLOATS, ExpertLayer, ExpertTensor
from moed.daemon.engine.slots import CacheStats, LayerSlots

MX_DTYPES = {
    "F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16, "U32": mx.uint32,
    "U8": mx.uint8, "I8": mx.int8, "U16": mx.uint16, "I32": mx.int32,
}
HEAT_DECAY = 0.95


class Reader(Protocol):
    """The fetcher's interface: start reading byte ranges, then wait for views of them."""

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


class ExpertStore:
    """Slot pools, slot tables and the reader that fills them, for every MoE layer.

    Args:
        layers: the index of each MoE layer's expert tensors.
        n_slots: slots per layer.
        reader: reads byte ranges (the fetcher fronting the I/O workers).
        cast: see TensorPool.
    """

    def __init__(self, layers: list[ExpertLayer], n_slots: list[int], reader: Reader,
                 cast: mx.Dtype | None = None):
        self.layers = layers
        self.reader = reader
        self.pools = [[TensorPool(t, n, cast) for t in layer.tensors] for layer, n in zip(layers, n_slots)]
        self.slots = [LayerSlots(n, layer.num_experts) for layer, n in zip(layers, n_slots)]
        n = len(layers)
        self.stats = CacheStats(layer_hits=[0] * n, layer_misses=[0] * n)
        self.trace: list | None = None  # (layer, experts) per decode visit, when recording a trace
        self.ahead: Pending | None = None  # a lookahead read in flight
        self._predicted: tuple[int, set] = (-1, set())  # the last prefetch's layer and experts
        # recent use per (layer, expert), decayed once per model step (half-life ~14 steps)
        self.heat = np.zeros((n, max(layer.num_experts for layer in layers)), dtype=np.float32)

    def ensure(self, layer: int, experts: np.ndarray) -> np.ndarray:
        """Make `experts` (unique, at most the layer's slots) resident; return the layer's LUT."""
        self.finish(self.begin(layer, experts))
        return self.slots[layer].lut

    def prefetch(self, layer: int, experts: np.ndarray) -> None:
        """Lookahead: give `experts` of `layer` slots and start reading the missed ones now; the
        layer's own step settles the read first. Not counted as hits or misses."""
        slots = self.slots[layer]
        experts = experts[(experts >= 0) & (experts < self.layers[layer].num_experts)]
        if self.ahead is not None or len(experts) > slots.n_slots:
            return
        _, filled = slots.assign(experts)
        self._predicted = (layer, {e for e, _ in filled})
        if filled:
            self.ahead = self._submit(layer, filled)
            self.stats.prefetched += len(filled)

    def settle(self) -> None:
        """Copy a lookahead read into its slots (before any other read or compute). A failed one
        is dropped: it was a guess, and the layer's own read reports a real failure."""
        if self.ahead is not None:
            p, self.ahead = self.ahead, None
            try:
                self.finish(p)
            except Exception:  # finish() has freed the slots
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

    def begin(self, layer: int, experts: np.ndarray) -> Pending | None:
        """Give `experts` slots and start reading the missed ones; None when all are resident."""
        self.settle()
        slots = self.slots[layer]
        if self._predicted[0] == layer:
            self.stats.prefetch_used += len(self._predicted[1].intersection(experts.tolist()))
            self._predicted = (-1, set())
        if layer == 0:
            self.heat *= HEAT_DECAY
        self.heat[layer, experts] += 1
        hits, filled = slots.assign(experts)
        self.stats.hits += hits
        self.stats.misses += len(filled)
        self.stats.layer_hits[layer] += hits
        self.stats.layer_misses[layer] += len(filled)
        if not filled:
            return None
        return self._submit(layer, filled)

    def count_resident(self, layer: int, pairs: int) -> None:
        """Account a step of a fully resident layer (no routing reaches the host there)."""
        self.stats.hits += pairs
        self.stats.layer_hits[layer] += pairs

    def finish(self, p: Pending | None) -> None:
        """Wait for a begun read and copy the bytes into their slots."""
        if p is None:
            return
        try:
            views = self.reader.wait(p.ticket)
        except BaseException:
            self.slots[p.layer].forget([e for e, _ in p.filled])
            raise
        pools = self.pools[p.layer]
        for i, (_, slot) in enumerate(p.filled):
            for j, pool in enumerate(pools):
                pool.write(slot, views[i * len(pools) + j])
        self.stats.read_seconds += time.perf_counter() - p.t0
        self.stats.bytes_read += sum(r[2] for r in p.ranges)

    def warm(self, order: list[np.ndarray] | None = None, progress=None) -> int:
        """Fill every slot before serving (the experts in `order` per layer, else the first ones).

        Returns the bytes read; the serving statistics start from zero afterwards.
        """
        total = 0
        for layer, slots in enumerate(self.slots):
            want = order[layer] if order is not None else np.arange(self.layers[layer].num_experts)
            self.ensure(layer, np.asarray(want[: slots.n_slots], dtype=np.int64))
            if progress:
                progress((layer + 1) / len(self.slots))
        total = self.stats.bytes_read
        n = len(self.slots)
        self.stats = CacheStats(layer_hits=[0] * n, layer_misses=[0] * n)
        self.heat[:] = 0
        return total

    def evictions(self) -> int:
        return sum(s.evictions for s in self.slots)

    def resident_bytes(self) -> int:
        """Bytes of the preallocated pools (the cache budget actually held)."""
        return sum(p.array.nbytes for pools in self.pools for p in pools)


class PagedSwitch(nn.Module):
    """Drop-in for SwitchGLU/SwitchMLP: same `(x, indices)` contract, experts paged from disk.

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
        if la is None or la.off is not None or indices.shape[-2] != 1 or self.store.trace is not None:
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

    def _read_ahead(self, predicted: mx.array | None) -> None:
        if predicted is not None:
            self.store.prefetch(self.layer + 1, np.unique(np.array(predicted)))

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        self.store.settle()
        slots = self.store.slots[self.layer]
        if slots.used == len(slots.lut) and self.store.trace is None:  # all resident: no paging, no sync
            if slots.device_lut is None:
                slots.device_lut = mx.array(slots.lut)
            self.store.count_resident(self.layer, indices.size)
            return self.inner(x, slots.device_lut[indices])
        predicted = self._predict(indices)
        idx = np.array(indices)  # the one host sync of this layer: the router's choice
        at = slots.lut[idx]  # each pair's slot; -1 where its expert is not resident
        resident = at >= 0
        if resident.all():  # compute first: the bookkeeping runs while MLX does
            y = self.inner(x, mx.array(at))
            mx.async_eval(y)
            self._account(idx)
            self._read_ahead(predicted)
            return y
        experts = np.unique(idx)
        groups = slots.groups(experts)
        if len(groups) > 1:
            self._record(idx, experts)
            return self._by_group(x, idx, groups)
        return self._overlapped(x, idx, at.reshape(-1), resident.reshape(-1), experts, predicted)

    def _record(self, idx: np.ndarray, experts: np.ndarray) -> None:
        if self.store.trace is not None and idx.shape[-2] == 1:  # decode steps only
            self.store.trace.append((self.layer, experts.tolist()))

    def _account(self, idx: np.ndarray) -> None:
        """A step whose experts were all resident: hits, recency and heat only."""
        experts = np.unique(idx)
        self._record(idx, experts)
        self.store.begin(self.layer, experts)

    def _rows(self, xf: mx.array, at: np.ndarray, rows: np.ndarray, k: int) -> mx.array:
        """The expert outputs of the (token, choice) pairs `rows` of the flattened pairs, whose
        experts sit in slots `at`."""
        return self.inner(xf[mx.array(rows // k)], mx.array(at[rows])[:, None])[:, 0]

    def _overlapped(self, x: mx.array, idx: np.ndarray, at: np.ndarray, resident: np.ndarray,
                    experts: np.ndarray, predicted: mx.array | None) -> mx.array:
        """Start computing the resident pairs, then read the missed experts meanwhile, with the
        next layer's lookahead read right behind (it runs while the misses compute)."""
        k, flat = idx.shape[-1], idx.reshape(-1)
        xf = x.reshape(-1, x.shape[-1])
        hit_rows, miss_rows = np.flatnonzero(resident), np.flatnonzero(~resident)
        y_hit = None
        if len(hit_rows):
            y_hit = self._rows(xf, at, hit_rows, k)
            mx.async_eval(y_hit)  # runs while the workers read the misses
        self._record(idx, experts)
        pending = self.store.begin(self.layer, experts)  # hits keep their slots
        self._read_ahead(predicted)  # queued behind this layer's own read
        self.store.finish(pending)
        lut = self.store.slots[self.layer].lut
        if y_hit is None:
            y = self.inner(x, mx.array(lut[idx]))
        else:
            y = mx.concatenate([y_hit, self._rows(xf, lut[flat], miss_rows, k)])
            y = y[mx.array(np.argsort(np.concatenate([hit_rows, miss_rows])))].reshape(*idx.shape, -1)
        mx.async_eval(y)  # computes while the next layer's graph is built
        return y

    def _by_group(self, x: mx.array, idx: np.ndarray, groups: list[np.ndarray]) -> mx.array:
        """More experts than slots (a long prompt on a small cache): one group at a time.

        Each (token, choice) pair is computed exactly once, with its expert resident.
        """
        k, flat = idx.shape[-1], idx.reshape(-1)
        xf = x.reshape(-1, x.shape[-1])
        pieces, order = [], []
        for group in groups:
            lut = self.store.ensure(self.layer, group)
            sel = np.nonzero(np.isin(flat, group))[0]
            y = self._rows(xf, lut[flat], sel, k)
            mx.eval(y)  # the next group overwrites these slots
            pieces.append(y)
            order.append(sel)
        inverse = np.argsort(np.concatenate(order))
        y = mx.concatenate(pieces)[mx.array(inverse)]
        return y.reshape(*idx.shape, y.shape[-1])
