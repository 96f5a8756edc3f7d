"""Synthetic MoE checkpoints in the exact mlx-lm on-disk format.

The model is built with mlx-lm's own classes and quantized with mlx-lm's own
``quantize_model`` (4-bit, group size 64, affine; the model's
``quant_predicate`` decides the exceptions, e.g. 8-bit routers). MLX arrays are
lazy, so the quantized model gives every tensor's shape and dtype without
computing anything. From those we lay out the safetensors shards up front and
then fill them:

* non-expert tensors are small: they are evaluated and written whole;
* expert tensors (``...switch_mlp.{gate,up,down}_proj.{weight,scales,biases}``,
  leading ``num_experts`` axis) are never materialized whole: a few experts at
  a time are drawn at random, quantized with ``mx.quantize`` and written at
  their offsets in the file.

Peak memory therefore stays bounded (a chunk of experts plus the non-expert
weights), whatever the size of the checkpoint.
"""

import contextlib
import copy
import hashlib
import io
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm.utils import _get_classes, get_total_parameters, quantize_model, save_config

from .synthetic_tokenizer import save_tokenizer

ARCHS = ("qwen3_moe", "qwen3_5_moe", "mixtral")
PRESETS = ("tiny", "small", "med")

Q_GROUP_SIZE = 64
Q_BITS = 4
Q_MODE = "affine"

GB = 1 << 30  # as in mlx_lm.utils.make_shards
MB = 1 << 20

# Shape of each preset, shared by all architectures.
_PRESET_DIMS = {
    "tiny": dict(
        hidden=128, layers=4, experts=16, top_k=4, moe_inter=128, dense_inter=256,
        heads=4, kv_heads=2, head_dim=32, vocab=1024, lin_k_heads=2,
        lin_v_heads=4, lin_head_dim=32,
    ),
    "small": dict(
        hidden=512, layers=8, experts=64, top_k=8, moe_inter=512, dense_inter=1024,
        heads=8, kv_heads=2, head_dim=64, vocab=1024, lin_k_heads=4,
        lin_v_heads=8, lin_head_dim=64,
    ),
    "med": dict(
        hidden=1024, layers=12, experts=128, top_k=8, moe_inter=512,
        dense_inter=2048, heads=16, kv_heads=4, head_dim=64, vocab=1024,
        lin_k_heads=8, lin_v_heads=16, lin_head_dim=64,
    ),
}

# Largest shard; tiny is kept small so tests exercise the multi-shard path.
_SHARD_CAP = {"tiny": 2 * MB, "small": 1 * GB, "med": 1 * GB}

# When scaling to a size, more experts than this per layer adds layers instead.
MAX_EXPERTS = 512

# Float32 bytes of random expert weights drawn at once (bounds peak memory).
_CHUNK_BYTES = 32 * MB

_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}

# safetensors dtype names, as MLX writes them.
_ST_DTYPES = {
    mx.bool_: "BOOL", mx.uint8: "U8", mx.int8: "I8", mx.uint16: "U16",
    mx.int16: "I16", mx.uint32: "U32", mx.int32: "I32", mx.uint64: "U64",
    mx.int64: "I64", mx.float16: "F16", mx.bfloat16: "BF16", mx.float32: "F32",
}


# ---------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------


def _qwen3_moe_config(d: dict) -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": d["hidden"],
        "num_hidden_layers": d["layers"],
        "intermediate_size": d["dense_inter"],
        "num_attention_heads": d["heads"],
        "num_key_value_heads": d["kv_heads"],
        "head_dim": d["head_dim"],
        "num_experts": d["experts"],
        "num_experts_per_tok": d["top_k"],
        "moe_intermediate_size": d["moe_inter"],
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 32768,
        "vocab_size": d["vocab"],
        "tie_word_embeddings": False,
    }


def _qwen3_5_moe_config(d: dict) -> dict:
    # Same layout as Qwen/Qwen3.5 MoE: the language model lives in text_config.
    interval = 4
    text_config = {
        "model_type": "qwen3_5_moe_text",
        "hidden_size": d["hidden"],
        "num_hidden_layers": d["layers"],
        "intermediate_size": d["dense_inter"],
        "num_attention_heads": d["heads"],
        "num_key_value_heads": d["kv_heads"],
        "head_dim": d["head_dim"],
        "linear_num_key_heads": d["lin_k_heads"],
        "linear_num_value_heads": d["lin_v_heads"],
        "linear_key_head_dim": d["lin_head_dim"],
        "linear_value_head_dim": d["lin_head_dim"],
        "linear_conv_kernel_dim": 4,
        "full_attention_interval": interval,
        "layer_types": [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention"
            for i in range(d["layers"])
        ],
        "num_experts": d["experts"],
        "num_experts_per_tok": d["top_k"],
        "moe_intermediate_size": d["moe_inter"],
        "shared_expert_intermediate_size": d["moe_inter"],
        "decoder_sparse_step": 1,
        "norm_topk_prob": True,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [11, 11, 10],
        },
        "max_position_embeddings": 32768,
        "vocab_size": d["vocab"],
        "tie_word_embeddings": False,
        "attention_bias": False,
    }
    return {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "tie_word_embeddings": False,
        "text_config": text_config,
    }


def _mixtral_config(d: dict) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": d["hidden"],
        "num_hidden_layers": d["layers"],
        "intermediate_size": d["moe_inter"],
        "num_attention_heads": d["heads"],
        "num_key_value_heads": d["kv_heads"],
        "num_local_experts": d["experts"],
        "num_experts_per_tok": d["top_k"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 32768,
        "vocab_size": d["vocab"],
        "tie_word_embeddings": False,
    }


_CONFIG_BUILDERS = {
    "qwen3_moe": _qwen3_moe_config,
    "qwen3_5_moe": _qwen3_5_moe_config,
    "mixtral": _mixtral_config,
}

# Layers are added in multiples of this (qwen3_5: keep the attention pattern).
_LAYER_STEP = {"qwen3_moe": 1, "qwen3_5_moe": 4, "mixtral": 1}


def make_config(arch: str, preset: str = "tiny", **overrides) -> dict:
    """Build the Hugging Face style config of a synthetic model.

    Args:
        arch (str): One of ``ARCHS``.
        preset (str): One of ``PRESETS``.
        overrides: Preset dimensions to replace (e.g. ``experts=32``,
            ``layers=8``).

    Returns:
        dict: The (unquantized) model config.
    """
    if arch not in ARCHS:
        raise ValueError(f"Unknown arch {arch!r}, expected one of {ARCHS}.")
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}, expected one of {PRESETS}.")
    dims = {**_PRESET_DIMS[preset], **overrides}
    return _CONFIG_BUILDERS[arch](dims)


# ---------------------------------------------------------------------------
# The lazy quantized model
# ---------------------------------------------------------------------------


def build_lazy_model(config: dict, dtype: str = "float32", init=None):
    """Build and quantize a model with mlx-lm, without evaluating any weight.

    Args:
        config (dict): The model config.
        dtype (str): Dtype of the non-quantized weights and of the
            quantization scales and biases.
        init (Callable[[nn.Module], None], optional): Called on the model
            after mlx-lm's init, before the cast and quantization.

    Returns:
        Tuple[nn.Module, dict]: The lazy quantized model and its config with
        ``quantization`` and ``quantization_config`` set by mlx-lm.
    """
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))

    # mlx-lm's init elsewhere, but unit-variance embeddings: with
    # N(0, 1/hidden) the token signal is too weak against the residual stream
    # and greedy decoding of a random model falls into one-token loops.
    for _, m in model.named_modules():
        if isinstance(m, nn.Embedding):
            m.weight = mx.random.normal(m.weight.shape)
    if init is not None:
        init(model)

    # Cast like mlx_lm.convert does, before quantizing so scales follow.
    target = _DTYPES[dtype]
    cast_predicate = getattr(model, "cast_predicate", lambda _: True)

    def set_dtype(k, v):
        if cast_predicate(k) and mx.issubdtype(v.dtype, mx.floating):
            return v.astype(target)
        return v

    model.update(tree_map_with_path(set_dtype, model.parameters()))

    # quantize_model prints the bits per weight; keep the caller's stdout clean.
    with contextlib.redirect_stdout(io.StringIO()):
        model, config = quantize_model(
            model, config, Q_GROUP_SIZE, Q_BITS, mode=Q_MODE
        )
    return model, config


def is_expert_key(key: str) -> bool:
    """Whether a tensor key belongs to the stacked routed experts."""
    return ".switch_mlp." in key


def _model_nbytes(config: dict, dtype: str) -> int:
    model, _ = build_lazy_model(copy.deepcopy(config), dtype)
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def _text_config(config: dict) -> dict:
    return config.get("text_config", config)


def _scale_to_size(arch: str, preset: str, size_bytes: float, dtype: str) -> dict:
    """Pick the expert count (and layer count if needed) to hit a size.

    The checkpoint size is affine in the expert count and, per group of
    ``_LAYER_STEP`` layers, in the layer count; the coefficients are measured on
    lazy models (cheap: nothing is evaluated).
    """
    d = _PRESET_DIMS[preset]
    step = _LAYER_STEP[arch]
    L0, E0 = d["layers"], d["experts"]

    def nbytes(layers, experts):
        return _model_nbytes(make_config(arch, preset, layers=layers, experts=experts), dtype)

    b0 = nbytes(L0, E0)
    per_expert_layer = (nbytes(L0, 2 * E0) - b0) / (E0 * L0)
    per_layer = (nbytes(L0 + step, E0) - b0) / step - per_expert_layer * E0
    fixed = b0 - L0 * (per_layer + per_expert_layer * E0)

    def experts_for(layers):
        return (size_bytes - fixed - layers * per_layer) / (layers * per_expert_layer)

    layers = L0
    if experts_for(layers) > MAX_EXPERTS:
        per_group = step * (per_layer + MAX_EXPERTS * per_expert_layer)
        layers = step * math.ceil((size_bytes - fixed) / per_group)
    experts = max(d["top_k"], round(experts_for(layers)))
    return make_config(arch, preset, layers=layers, experts=experts)


# ---------------------------------------------------------------------------
# Shard layout
# ---------------------------------------------------------------------------


@dataclass
class TensorSpec:
    """Where one tensor lives on disk."""

    key: str
    shape: Tuple[int, ...]
    dtype: mx.Dtype
    shard: int = 0  # set by _plan_shards
    offset: int = 0  # absolute file offset of the data, set by _shard_header

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.size


def _plan_shards(specs: List[TensorSpec], max_shard_bytes: int) -> int:
    """Assign shards greedily in order, like ``mlx_lm.utils.make_shards``.

    Returns:
        int: The number of shards.
    """
    shard, size = -1, 0
    for s in specs:
        if shard < 0 or size + s.nbytes > max_shard_bytes:
            shard, size = shard + 1, 0
        s.shard = shard
        size += s.nbytes
    return shard + 1


def _shard_header(specs: List[TensorSpec]) -> bytes:
    """Build a safetensors header the way ``mx.save_safetensors`` does.

    Keys are sorted, the JSON is compact, ``{"format": "mlx"}`` is the
    metadata. Data follows in sorted key order. Sets each spec's ``offset``.
    """
    specs = sorted(specs, key=lambda s: s.key)
    header = {"__metadata__": {"format": "mlx"}}
    start = 0
    for s in specs:
        header[s.key] = {
            "data_offsets": [start, start + s.nbytes],
            "dtype": _ST_DTYPES[s.dtype],
            "shape": list(s.shape),
        }
        start += s.nbytes
    blob = json.dumps(dict(sorted(header.items())), separators=(",", ":")).encode()
    base = 8 + len(blob)
    for s in specs:
        s.offset = base + header[s.key]["data_offsets"][0]
    return struct.pack("<Q", len(blob)) + blob


def shard_name(i: int, n: int) -> str:
    """The file name of shard ``i`` (0-based) of ``n``, as mlx-lm names it."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def _to_bytes(a: mx.array) -> memoryview:
    """Raw little-endian bytes of an array (works for bfloat16 too)."""
    a = mx.contiguous(a)
    if a.dtype.size == 2:
        a = a.view(mx.uint16)
    mx.eval(a)
    return memoryview(a).cast("B")


def _derived_seed(*parts) -> int:
    """A stable 64-bit seed from the parts (Python's hash() is salted)."""
    text = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


_STREAMS = []


def _streams():
    """Streams on the default device to generate experts in parallel."""
    if not _STREAMS:
        n = min(os.cpu_count() or 1, 8) if mx.default_device() == mx.cpu else 2
        _STREAMS.extend(mx.new_stream(mx.default_device()) for _ in range(n))
    return _STREAMS


def _expert_chunks(
    prefix: str, specs: Dict[str, TensorSpec], quant: dict, dtype, seed: int
):
    """Yield chunks of quantized experts as lists of ``(expert, arrays)``.

    ``arrays`` maps "weight", "scales" and "biases" to the expert's slices.
    Each expert is drawn with its own key, so the data does not depend on the
    chunk size. Weights follow mlx-lm's init: ``U(-1/sqrt(in), 1/sqrt(in))``.
    """
    w = specs["weight"]
    num_experts, out_dims = w.shape[0], w.shape[1]
    in_dims = specs["scales"].shape[-1] * quant["group_size"]
    scale = 1.0 / math.sqrt(in_dims)
    per_chunk = max(1, _CHUNK_BYTES // (out_dims * in_dims * 4))

    streams = _streams()

    def expert(e):
        # Round-robin over streams: on the CPU each stream runs on its thread.
        with mx.stream(streams[e % len(streams)]):
            key = mx.random.key(_derived_seed(seed, prefix, e))
            x = mx.random.uniform(-scale, scale, (out_dims, in_dims), key=key)
            q = mx.quantize(
                x.astype(dtype), quant["group_size"], quant["bits"], mode=quant["mode"]
            )
        return e, dict(zip(("weight", "scales", "biases"), q))

    for e0 in range(0, num_experts, per_chunk):
        yield [expert(e) for e in range(e0, min(e0 + per_chunk, num_experts))]


def _write_experts(fds, prefix, specs, quant, seed, advance):
    """Generate one stacked expert module chunk by chunk into its shard(s)."""
    dtype = specs["scales"].dtype
    for chunk in _expert_chunks(prefix, specs, quant, dtype, seed):
        mx.eval([arrays for _, arrays in chunk])
        for e, arrays in chunk:
            for suffix, arr in arrays.items():
                s = specs[suffix]
                assert arr.dtype == s.dtype and arr.shape == s.shape[1:], s
                data = _to_bytes(arr)
                os.pwrite(fds[s.shard], data, s.offset + e * len(data))
                advance(len(data))
        del chunk
        mx.clear_cache()


def _quant_params(config: dict, path: str) -> dict:
    q = config["quantization"]
    params = {"group_size": q["group_size"], "bits": q["bits"], "mode": q.get("mode", "affine")}
    if isinstance(q.get(path), dict):
        params.update(q[path])
    return params


def _progress(enabled: bool, total: int, description: str):
    """A rich progress bar over bytes, or a no-op."""
    if not enabled:
        return contextlib.nullcontext(lambda n: None)

    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    @contextlib.contextmanager
    def bar():
        with Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TimeRemainingColumn(),
        ) as p:
            task = p.add_task(description, total=total)
            yield lambda n: p.advance(task, n)

    return bar()


def _expert_modules(specs: List[TensorSpec]) -> Dict[str, Dict[str, TensorSpec]]:
    """Group the expert tensors by module: ``{prefix: {suffix: spec}}``."""
    modules: Dict[str, Dict[str, TensorSpec]] = {}
    for s in specs:
        if is_expert_key(s.key):
            prefix, suffix = s.key.rsplit(".", 1)
            modules.setdefault(prefix, {})[suffix] = s
    for prefix, m in modules.items():
        if set(m) != {"weight", "scales", "biases"}:
            raise ValueError(f"Unexpected expert tensors under {prefix}: {sorted(m)}")
    return modules


def _write_shards(
    out_dir: Path,
    weights: Dict[str, mx.array],
    specs: List[TensorSpec],
    num_shards: int,
    config: dict,
    seed: int,
    progress: bool,
):
    """Write all shards: headers, then non-expert tensors, then experts.

    ``weights`` holds the (lazy) non-expert tensors; each is evaluated, written
    and dropped in turn.
    """
    total = sum(s.nbytes for s in specs)
    fds = []
    try:
        for i in range(num_shards):
            shard_specs = [s for s in specs if s.shard == i]
            header = _shard_header(shard_specs)
            path = out_dir / shard_name(i, num_shards)
            fds.append(os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644))
            os.ftruncate(fds[-1], len(header) + sum(s.nbytes for s in shard_specs))
            os.pwrite(fds[-1], header, 0)

        with _progress(progress, total, f"Writing {out_dir.name}") as advance:
            for s in specs:
                if not is_expert_key(s.key):
                    data = _to_bytes(weights.pop(s.key))
                    os.pwrite(fds[s.shard], data, s.offset)
                    advance(len(data))
            for prefix, module_specs in _expert_modules(specs).items():
                quant = _quant_params(config, prefix)
                _write_experts(fds, prefix, module_specs, quant, seed, advance)
    finally:
        for fd in fds:
            os.close(fd)


def make_model(
    out_dir: Union[str, Path],
    arch: str,
    preset: str = "tiny",
    size_gb: Optional[float] = None,
    dtype: str = "float32",
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Write a random, quantized MoE checkpoint that ``mlx_lm.load`` loads.

    Args:
        out_dir (Union[str, Path]): The checkpoint directory (created; old
            ``model*.safetensors`` in it are removed).
        arch (str): One of ``ARCHS``.
        preset (str): One of ``PRESETS``. Default: ``"tiny"``.
        size_gb (float, optional): Target size in GiB (2**30 bytes, as
            mlx-lm's shard size); scales the preset's expert count, and its
            layer count past ``MAX_EXPERTS`` experts. Default: ``None`` (the
            preset as is).
        dtype (str): Dtype of the non-quantized weights and of the
            quantization scales and biases: ``"float32"``, ``"bfloat16"`` or
            ``"float16"``. Default: ``"float32"``.
        seed (int): Random seed; the same seed gives byte-identical files.
            Reseeds MLX's global random generator.
        progress (bool): Show a rich progress bar. Default: ``True``.

    Returns:
        dict: ``path``, ``arch``, ``preset``, ``config`` (as saved),
        ``total_bytes`` (all tensors), ``expert_bytes``, ``non_expert_bytes``,
        ``shards`` (count) and ``disk_bytes`` (all files in ``out_dir``).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}, expected one of {tuple(_DTYPES)}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("model*.safetensors"):
        old.unlink()

    if size_gb is None:
        config = make_config(arch, preset)
    else:
        config = _scale_to_size(arch, preset, size_gb * GB, dtype)

    # Tokenizer first: its special token ids go into the config, and the model
    # gets exactly its vocabulary (a random model would emit unused ids).
    tok = save_tokenizer(out_dir, _text_config(config)["vocab_size"])
    _text_config(config)["vocab_size"] = tok["vocab_size"]
    config["eos_token_id"] = tok["eos_token_id"]
    config["torch_dtype"] = dtype

    mx.random.seed(_derived_seed(seed, arch))
    model, config = build_lazy_model(config, dtype)
    weights = dict(tree_flatten(model.parameters()))
    total_parameters = get_total_parameters(model)
    del model

    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in weights.items()]
    total = sum(s.nbytes for s in specs)
    num_shards = _plan_shards(specs, min(_SHARD_CAP[preset], max(total // 2, 1)))

    # Expert tensors stay lazy and are never evaluated: drop them now.
    for k in [k for k in weights if is_expert_key(k)]:
        del weights[k]
    _write_shards(out_dir, weights, specs, num_shards, config, seed, progress)

    index = {
        "metadata": {"total_size": total, "total_parameters": total_parameters},
        "weight_map": {
            s.key: shard_name(s.shard, num_shards)
            for s in sorted(specs, key=lambda s: s.key)
        },
    }
    with open(out_dir / "model.safetensors.index.json", "w") as f:
        json.dump(index, f, indent=4)
    save_config(config, out_dir / "config.json")
    with open(out_dir / "config.json") as f:
        saved_config = json.load(f)

    expert_bytes = sum(s.nbytes for s in specs if is_expert_key(s.key))
    return {
        "path": str(out_dir),
        "arch": arch,
        "preset": preset,
        "config": saved_config,
        "total_bytes": total,
        "expert_bytes": expert_bytes,
        "non_expert_bytes": total - expert_bytes,
        "shards": num_shards,
        "disk_bytes": sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file()),
    }
