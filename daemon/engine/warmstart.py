"""Warm start: the expert cache filled at load with the experts the last runs used most.

Each run counts every (layer, expert) use (experts.Heat.counts); at exit (and now and then while a
daemon serves) the counts are saved to `<runtime dir>/heat/<fingerprint>.npy`, added to half the
counts saved before (so the file follows what the model is used for lately, over restarts). The next
load orders each layer's experts by those counts and fills the slots with the first ones, instead of
experts 0..n-1 (`--no-warm-start`: the old fill). The fingerprint is the prompt cache's (the checkpoint's config and tensor layout,
mlx-lm's version) plus the top-k and the rank's layers: another model's, k's or split's counts are
never used.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from moed.daemon.engine.prompt_cache import model_fingerprint

CARRY = 0.5  # the weight of the counts saved before, at each save


class WarmStart:
    """The saved counts of one model (`path`), read once at load.

    `order()` is the fill order for ExpertStore.warm (None when nothing was saved); `save(counts)`
    writes this run's counts plus CARRY x the counts read at load, so saving again and again during
    one run writes the same sum, never counts twice.
    """

    def __init__(self, path: Path, num_experts: list[int]):
        self.path, self.num_experts = path, list(num_experts)
        self.before = self._read()

    @classmethod
    def for_model(cls, runtime_dir: str | Path, model_dir: str | Path, num_experts: list[int], *extra: str):
        """The counts of this checkpoint under `extra` (the top-k, this rank's layers) in the runtime dir."""
        return cls(Path(runtime_dir) / "heat" / f"{model_fingerprint(model_dir, *extra)}.npy", num_experts)

    def _read(self) -> np.ndarray | None:
        """The saved counts, or None when there are none or not of this shape (a damaged file is removed)."""
        try:
            counts = np.load(self.path)  # numpy never unpickles by default
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            self.path.unlink(missing_ok=True)
            return None
        if counts.shape != (len(self.num_experts), max(self.num_experts)) or not np.isfinite(counts).all():
            return None
        return counts

    def order(self) -> list[np.ndarray] | None:
        """Each layer's experts, most used first (ties: lower index first, as a cold start)."""
        if self.before is None:
            return None
        return [np.argsort(-self.before[i, :n], kind="stable") for i, n in enumerate(self.num_experts)]

    def save(self, counts: np.ndarray) -> None:
        """Write `counts` + CARRY x the counts read at load, owner-only and atomically."""
        total = counts.astype(np.float64) + (CARRY * self.before if self.before is not None else 0.0)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            np.save(f, total)  # a float array: no pickle in the file
        os.replace(tmp, self.path)
