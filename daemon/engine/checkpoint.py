"""Where a checkpoint is and what it holds: the directory or HF-cache snapshot, its config's MoE
figures, and the index of its experts' byte ranges (headers only)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model

from moed.daemon.engine.index import CheckpointError, ExpertLayer, TensorTable
from moed.daemon.engine.modules import find_switches


def hf_cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return dirs


def resolve_model(model: str | Path) -> Path:
    """A checkpoint directory, or a Hugging Face repo id already in the local HF cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path}: no config.json, not a model directory")
        return path
    looked = [str(path)]
    if "/" in str(model) and not str(model).startswith((".", "/")):
        repo = "models--" + str(model).replace("/", "--")
        for cache in hf_cache_dirs():
            snapshots = cache / repo / "snapshots"
            looked.append(str(snapshots))
            ref = cache / repo / "refs" / "main"
            if ref.exists() and (snapshots / ref.read_text().strip() / "config.json").exists():
                return snapshots / ref.read_text().strip()
            found = sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime)
            if found:
                return found[-1].parent
    raise CheckpointError(f"model {model!s} not found (nothing is downloaded); looked in: " + ", ".join(looked))


def hidden_size_of(config: dict) -> int | None:
    for cfg in (config, config.get("text_config", {})):
        for key in ("hidden_size", "d_model", "model_dim", "n_embd", "dim"):
            if isinstance(cfg.get(key), int):
                return cfg[key]
    return None


TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_top_k", "top_k")


def top_k_of(config: dict) -> int:
    """Experts per token from the config (a per-layer list: its largest)."""
    for cfg in (config, config.get("text_config", {})):
        for key in TOP_K_KEYS:
            if key in cfg:
                k = cfg[key]
                return int(max(k) if isinstance(k, (list, tuple)) else k)
    raise CheckpointError(f"config.json names no experts per token (none of {', '.join(TOP_K_KEYS)})")


def index_experts(path: Path, switches: list[tuple[str, nn.Module]],
                  packed: bool = True) -> tuple[TensorTable, list[ExpertLayer]]:
    """The byte ranges of every switch module's experts (from the pack if current), validated
    against the model's shapes."""
    if not switches:
        raise CheckpointError(f"{path}: no SwitchGLU/SwitchMLP layers, not a mixture-of-experts model")
    table = TensorTable(path, packed)
    return table, [table.expert_layer(p, {k: v.shape for k, v in tree_flatten(m.parameters())})
                   for p, m in switches]


def lazy_model(path: Path) -> tuple[nn.Module, dict]:
    """mlx-lm's model for the checkpoint at `path`, weights lazy (nothing read but headers); any
    failure of mlx-lm to build it is a CheckpointError naming the architecture."""
    try:
        return load_model(path, lazy=True)
    except Exception as e:  # mlx-lm's strict load names the bad tensor; its classes may raise anything
        try:
            config = json.loads((path / "config.json").read_text())
            arch = config.get("model_type") or config.get("text_config", {}).get("model_type")
        except (OSError, ValueError, AttributeError):
            arch = None
        raise CheckpointError(f"{path}: mlx-lm cannot load this {arch or 'unknown'} checkpoint "
                              f"({type(e).__name__}: {e})") from e


def expert_index(model: str | Path, packed: bool = True) -> tuple[TensorTable, list[ExpertLayer], dict]:
    """Headers only: the expert index and config of a checkpoint (nothing is read but headers)."""
    path = resolve_model(model)
    net, config = lazy_model(path)
    table, layers = index_experts(path, find_switches(net), packed)
    return table, layers, config
