"""Tiny random checkpoints of every mlx-lm MoE architecture, for the coverage test.

Each entry of `ZOO` is a Hugging Face style config (our own, small: hidden 128, a few layers, 8-16
experts) for one `model_type` of the installed mlx-lm. `make_tiny` builds it with mlx-lm's own
classes, quantizes it with mlx-lm (4-bit, group 64), and saves it with mlx-lm's `save_model`,
next to the synthetic tokenizer: exactly what `mlx_lm.convert` would leave on disk.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path
from mlx_lm.utils import save_config, save_model

from .synthetic import build_lazy_model
from .synthetic_tokenizer import save_tokenizer
from .zoo_configs import CONFIGS as ZOO  # model_type -> config entry

# Shared by most configs; each entry overrides or adds what its architecture needs.
BASE = {
    "hidden_size": 128,
    "num_hidden_layers": 3,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 1024,
    "num_experts_per_tok": 4,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}

def zoo_config(arch: str) -> dict:
    """The full config of `arch`'s tiny checkpoint (BASE merged with its entry)."""
    if arch not in ZOO:
        raise KeyError(f"no tiny config for {arch!r}; known: {', '.join(sorted(ZOO))}")
    entry = copy.deepcopy(ZOO[arch])
    if entry.pop("_no_base", False):
        return entry
    config = {**copy.deepcopy(BASE), **entry}
    if "text_config" in config and isinstance(config["text_config"], dict):
        config["text_config"] = {**copy.deepcopy(BASE), **config["text_config"]}
    return config


# Parameters mlx-lm creates as zeros that a trained model would not have as zeros: a zero router
# sends every token to the same experts, and the test would page nothing.
ROUTING_PARAMS = re.compile(r"(^|\.)(gate|router)(\.|$)|(e_score_correction|expert|router)_bias$")


def randomize_routers(model: nn.Module) -> None:
    """Draw every all-zero routing parameter (router weights, score-correction and expert biases)."""
    def draw(path, v):
        if not (ROUTING_PARAMS.search(path) and mx.issubdtype(v.dtype, mx.floating) and not mx.any(v).item()):
            return v
        scale = v.shape[-1] ** -0.5 if v.ndim > 1 else 0.1
        return (mx.random.normal(v.shape) * scale).astype(v.dtype)

    model.update(tree_map_with_path(draw, model.parameters()))


def _text(config: dict) -> dict:
    return config["text_config"] if isinstance(config.get("text_config"), dict) else config


def make_tiny(out_dir: str | Path, arch: str, seed: int = 0, config: dict | None = None) -> Path:
    """Write `arch`'s tiny 4-bit checkpoint to `out_dir` (mlx-lm format) and return the path.

    Args:
        out_dir: the checkpoint directory (created).
        arch: a key of ZOO (ignored when `config` is given, but for naming).
        seed: MLX's random seed for the weights.
        config: the config to build instead of ZOO's.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(config) if config is not None else zoo_config(arch)
    tok = save_tokenizer(out, _text(config)["vocab_size"])
    _text(config)["vocab_size"] = tok["vocab_size"]
    config["eos_token_id"] = tok["eos_token_id"]
    mx.random.seed(seed)
    model, config = build_lazy_model(config, init=randomize_routers)
    mx.eval(model.parameters())
    save_model(out, model)
    save_config(config, out / "config.json")
    return out

# What the coverage test (tests/test_archs.py) expects and the README's table says.
# Exact, but lookahead cannot apply: the reason.
LOOKAHEAD_OFF: dict[str, str] = {
    "gemma4": "the router sits in the decoder layer, not in a MoE block, and routes the residual "
              "while the experts see a normed input",
    "gemma4_text": "as gemma4",
}
# mlx-lm itself cannot run these here: the reason (the test skips them where it can't).
METAL_ONLY: dict[str, str] = {
    "muse_spark": "mlx-lm computes its attention with Metal-only kernels (mx.fast.metal_kernel, no CPU path)",
}
# moed refuses these at load with an error naming the architecture: the reason.
REFUSED: dict[str, str] = {}
