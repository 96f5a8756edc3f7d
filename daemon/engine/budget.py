"""Memory: how many slots each layer gets, the staging buffer, and whether a configuration fits
in the memory available (checked before any weight is read; `moed plan` reports the same figures)."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import psutil

from moed.daemon.engine.index import DTYPE_BYTES, FLOATS, ExpertLayer

RUNTIME_BYTES = 300 << 20  # Python + MLX + MLX's buffer cache cap, measured 160-260 MB over weights + cache


WORKER_BYTES = 40 << 20  # RSS of one I/O worker process


class DoesNotFit(ValueError):
    """A configuration needs more memory than there is; the message has the figures."""


def mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 10e6 else f"{n / 1e6:.2f} MB"


def need_bytes(non_expert: int, cache: int, staging: int, workers: int, kv: int = 0) -> int:
    return non_expert + cache + staging + kv + RUNTIME_BYTES + workers * WORKER_BYTES


def available_bytes() -> int:
    """Memory available now: the machine's, or less under a cgroup memory limit (a container, a
    systemd slice: `cgroup_available`). `MOED_RAM_GB` overrides: plan for a smaller machine, or test."""
    override = os.environ.get("MOED_RAM_GB")
    if override:
        return int(float(override) * 1e9)
    free = psutil.virtual_memory().available
    limited = cgroup_available()
    return free if limited is None else min(free, limited)


UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2^63 - 1


def cgroup_available(proc: str | Path = "/proc/self/cgroup", root: str | Path = "/sys/fs/cgroup") -> int | None:
    """Bytes this process's cgroups (v2, or v1's memory controller) still allow: over it and its
    ancestors, the least of limit - (usage - page cache, which the kernel reclaims under the limit,
    as the machine's "available" counts it).
    None without a limit, or off Linux (no /proc/self/cgroup: macOS)."""
    try:
        lines = Path(proc).read_text().splitlines()
    except OSError:
        return None
    root, least = Path(root), None
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2: the unified hierarchy
            base, files = root, ("memory.max", "memory.current", ("active_file", "inactive_file"))
        elif "memory" in controllers.split(","):
            base, files = root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                            ("total_active_file", "total_inactive_file"))
        else:
            continue
        parts = [q for q in path.strip().split("/") if q]
        for depth in range(len(parts), -1, -1):  # the cgroup, then each ancestor (a namespace shows only some)
            left = _cgroup_left(base.joinpath(*parts[:depth]), *files)
            if left is not None:
                least = left if least is None else min(least, left)
    return least


def _cgroup_left(d: Path, limit_file: str, usage_file: str, file_keys: tuple[str, ...]) -> int | None:
    try:
        raw = (d / limit_file).read_text().strip()
        if raw == "max" or int(raw) >= UNLIMITED:
            return None
        usage = int((d / usage_file).read_text())
    except (OSError, ValueError):
        return None
    cache = 0
    try:
        for row in (d / "memory.stat").read_text().splitlines():
            key, _, value = row.partition(" ")
            if key in file_keys:
                cache += int(value)
    except (OSError, ValueError):
        pass
    return max(0, int(raw) - max(0, usage - cache))


def check_fits(non_expert: int, cache: int, staging: int, workers: int) -> None:
    """Raise DoesNotFit unless the model as configured fits in the memory available now."""
    need = need_bytes(non_expert, cache, staging, workers)
    available = available_bytes()
    if need > available:
        raise DoesNotFit(
            f"this configuration needs {mb(need)} (non-expert weights {mb(non_expert)}, expert cache "
            f"{mb(cache)}, staging {mb(staging)}, the rest {mb(need - non_expert - cache - staging)}) but "
            f"{mb(available)} is available; use a smaller --cache-fraction/--cache-gb (see `moed plan`)")


# ---------------------------------------------------------------- cache sizing


# lookahead by default when a layer caches at most this share of its experts: every partial cache,
# since it measured faster at 50%, 25% and 10% (bench/results/med-lookahead.json)
LOOKAHEAD_BELOW = 0.99


def cached_expert_nbytes(layer: ExpertLayer, cast: mx.Dtype | None) -> int:
    """Bytes one expert takes in the pool (after an optional cast of its float tensors)."""
    total = 0
    for t in layer.tensors:
        if cast is not None and t.info.dtype in FLOATS:
            total += t.expert_nbytes // DTYPE_BYTES[t.info.dtype] * cast.size
        else:
            total += t.expert_nbytes
    return total


def auto_lookahead(n_slots: list[int], layers: list[ExpertLayer]) -> bool:
    return min(n / layer.num_experts for n, layer in zip(n_slots, layers)) <= LOOKAHEAD_BELOW


def staging_bytes(n_slots: list[int], layers: list[ExpertLayer], top_k: int, lookahead: bool) -> int:
    """The workers' shared memory: a layer's whole cache (warm-up, long prompts), and with
    lookahead a decode step's own misses plus the next layer's read in flight at once."""
    return max(max(n, 2 * top_k if lookahead else 0) * layer.expert_nbytes for n, layer in zip(n_slots, layers))


def slots_per_layer(layers: list[ExpertLayer], top_k: int, cast: mx.Dtype | None,
                    fraction: float | None = None, gb: float | None = None) -> list[int]:
    """Slots each layer gets: a fraction of its experts, or an even split of a byte budget.

    Never fewer than top-k (one token's experts must fit at once) nor more than all experts.
    Neither given: everything if it fits in half of this machine's RAM, else what does.
    """
    per = [cached_expert_nbytes(layer, cast) for layer in layers]
    if fraction is None and gb is None:
        total = sum(p * layer.num_experts for p, layer in zip(per, layers))
        half_ram = psutil.virtual_memory().total // 2
        fraction, gb = (1.0, None) if total <= half_ram else (None, half_ram / 1e9)
    if fraction is not None:  # both checked by PagingConfig
        want = [round(fraction * layer.num_experts) for layer in layers]
    else:
        want = [int(gb * 1e9 / sum(per))] * len(layers)
    return [min(layer.num_experts, max(top_k, w)) for layer, w in zip(layers, want)]
