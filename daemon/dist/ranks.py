"""Ranks: one model split across processes or hosts with MLX distributed.

`moed start/generate --ranks N` (N processes here) or `--hosts FILE` (an `mlx.launch` host file)
re-run the same command on every rank under `mlx.launch` (client/launch.py); each process then
finds its place with `link()`. mlx-lm's pipeline split (PipelineMixin) gives each rank a
contiguous run of decoder layers, rank 0 the last ones; each rank keeps only its layers' non-expert
weights and pages its own layers' experts with its own I/O workers. Control messages ride on the
same collectives, as mlx-lm's server shares its requests.
"""

from __future__ import annotations

import os
import socket
import time

import mlx.core as mx
import numpy as np
import psutil
from mlx_lm.generate import generation_stream
from mlx_lm.models.pipeline import PipelineMixin

from moed.daemon.engine.generate import peak_rss_bytes
from moed.daemon.engine.index import CheckpointError
from moed.ipc import codec
from moed.ipc.messages import RankStatus


def settle() -> None:
    """Wait for work in flight: mlx-lm evaluates the next step ahead, and its sends and receives
    must not interleave with a control message on the same connections."""
    mx.synchronize(generation_stream)
    mx.synchronize()


class RankLink:
    """This rank's end of the group: broadcast from rank 0, gather from all (typed messages)."""

    def __init__(self, group: mx.distributed.Group):
        self.group = group
        self.rank, self.size = group.rank(), group.size()

    def _sum(self, a: mx.array) -> mx.array:
        settle()
        out = mx.distributed.all_sum(a, group=self.group, stream=mx.cpu)
        mx.eval(out)
        return out

    def broadcast(self, msg=None):
        """Rank 0's `msg`, returned on every rank (the others pass nothing)."""
        data = b"".join(codec.encode(msg)) if self.rank == 0 else b""
        n = self._sum(mx.array([len(data)], dtype=mx.int64)).item()
        buf = mx.array(np.frombuffer(data, np.uint8)) if self.rank == 0 else mx.zeros((n,), mx.uint8)
        raw = bytes(np.array(self._sum(buf)))
        return codec.decode([raw[:1], raw[1:]])

    def gather(self, msg) -> list:
        """Every rank's `msg`, in rank order, returned on every rank."""
        data = b"".join(codec.encode(msg))
        settle()
        sizes = mx.distributed.all_gather(mx.array([len(data)], dtype=mx.int64), group=self.group, stream=mx.cpu)
        sizes = np.array(sizes).tolist()
        buf = np.zeros(max(sizes), np.uint8)
        buf[:len(data)] = np.frombuffer(data, np.uint8)
        rows = mx.distributed.all_gather(mx.array(buf)[None], group=self.group, stream=mx.cpu)
        rows = np.array(rows)
        return [codec.decode([bytes(row[:1]), bytes(row[1:n])]) for row, n in zip(rows, sizes)]

    def share_seed(self) -> None:
        """Seed every rank's sampler alike: ranks sample the same logits and must draw the same token."""
        seed = time.time_ns() % (1 << 31) if self.rank == 0 else 0
        mx.random.seed(self._sum(mx.array([seed], dtype=mx.int64)).item())


def link() -> RankLink | None:
    """This process's link when mlx.launch started it as one of several ranks, else None."""
    if os.environ.get("MLX_RANK") is None:
        return None
    group = mx.distributed.init(strict=True)
    return RankLink(group) if group.size() > 1 else None


def rank_status(pm, rank: int) -> RankStatus:
    """What this rank holds and has done (its own layers, cache and reads)."""
    st = pm.store.stats
    return RankStatus(rank=rank, host=socket.gethostname(), pid=os.getpid(),
                      layers=tuple(pm.info["layer_range"]), rss_bytes=psutil.Process().memory_info().rss,
                      peak_rss_bytes=peak_rss_bytes(),
                      non_expert_bytes=pm.non_expert_bytes, cache_bytes=pm.info["cache_bytes"],
                      hits=st.hits, misses=st.misses, bytes_read=st.bytes_read, workers=pm.fetcher.n_workers)
