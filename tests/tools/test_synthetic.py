"""Tests of the synthetic checkpoint writer (moed.daemon.tools.synthetic)."""

import hashlib
import json
import re
import struct
import subprocess
import sys
import textwrap
import warnings

import mlx.core as mx
import mlx_lm
import pytest
from mlx.utils import tree_flatten
from safetensors import safe_open

from moed.daemon.tools import synthetic
from moed.daemon.tools.synthetic import ARCHS, GB, MB, is_expert_key, make_model

PROMPT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Tell me about the river and the old town."},
]

# One expert key and one non-expert key per arch, as written by mlx-lm.
EXPECTED_KEYS = {
    "qwen3_moe": (
        "model.layers.0.mlp.switch_mlp.gate_proj.weight",
        "model.layers.0.self_attn.q_proj.scales",
    ),
    "qwen3_5_moe": (
        "language_model.model.layers.0.mlp.switch_mlp.down_proj.scales",
        "language_model.model.layers.0.linear_attn.A_log",
    ),
    "mixtral": (
        "model.layers.0.block_sparse_moe.switch_mlp.up_proj.biases",
        "model.layers.0.block_sparse_moe.gate.weight",
    ),
}


def _shards(path):
    return sorted(path.glob("model-*.safetensors"))


def _hash_shards(path):
    h = hashlib.sha256()
    for f in _shards(path):
        h.update(f.read_bytes())
    return h.hexdigest()


def _num_experts(config):
    tc = config.get("text_config", config)
    return tc.get("num_experts", tc.get("num_local_experts"))


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_and_generates(tiny_model, arch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, tokenizer = mlx_lm.load(str(tiny_model(arch)))

    prompt = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    tokens = [
        r.token
        for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=24)
    ]
    assert len(tokens) > 0
    # A random model, but not a degenerate one: greedy decoding varies.
    assert len(set(tokens)) >= 6, tokens
    text = mlx_lm.generate(model, tokenizer, prompt="The fox", max_tokens=8)
    assert isinstance(text, str)


@pytest.mark.parametrize("arch", ARCHS)
def test_layout(tiny_model, arch):
    path = tiny_model(arch)
    files = _shards(path)
    assert 2 <= len(files)
    assert [f.name for f in files] == [
        f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)
    ]
    disk = sum(f.stat().st_size for f in path.iterdir())
    assert disk < 30 * MB

    index = json.loads((path / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert list(weight_map) == sorted(weight_map)

    seen, total = {}, 0
    for f in files:
        with safe_open(str(f), framework="numpy") as st:
            assert st.metadata() == {"format": "mlx"}
            for k in st.keys():
                seen[k] = f.name
                total += st.get_tensor(k).nbytes
    assert seen == weight_map
    assert index["metadata"]["total_size"] == total

    # The keys are exactly those of mlx-lm's quantized model, and every
    # quantizable layer is quantized.
    model, _ = mlx_lm.load(str(path), lazy=True)
    assert set(dict(tree_flatten(model.parameters()))) == set(weight_map)
    assert [n for n, m in model.named_modules() if hasattr(m, "to_quantized")] == []


@pytest.mark.parametrize("arch", ARCHS)
def test_expert_tensors(tiny_model, arch):
    path = tiny_model(arch)
    config = json.loads((path / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"]
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["group_size"] == 64
    assert config["quantization"]["mode"] == "affine"
    n = _num_experts(config)

    expert_key, other_key = EXPECTED_KEYS[arch]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert expert_key in index["weight_map"]
    assert other_key in index["weight_map"]

    experts = 0
    for f in _shards(path):
        with safe_open(str(f), framework="numpy") as st:
            for k in st.keys():
                if is_expert_key(k):
                    experts += 1
                    assert st.get_slice(k).get_shape()[0] == n, k
                    assert re.search(r"switch_mlp\.(gate|up|down)_proj\.(weight|scales|biases)$", k)
    layers = config.get("text_config", config)["num_hidden_layers"]
    assert experts == layers * 3 * 3


def test_qwen3_5_has_full_attention(tiny_model):
    config = json.loads((tiny_model("qwen3_5_moe") / "config.json").read_text())
    tc = config["text_config"]
    assert tc["num_hidden_layers"] >= tc["full_attention_interval"]
    model, _ = mlx_lm.load(str(tiny_model("qwen3_5_moe")), lazy=True)
    kinds = {layer.is_linear for layer in model.layers}
    assert kinds == {True, False}
    # The router and shared expert gate use 8 bits, as mlx-lm's predicate says.
    assert config["quantization"]["language_model.model.layers.0.mlp.gate"]["bits"] == 8


def test_router_spreads_tokens(tiny_model):
    model, tokenizer = mlx_lm.load(str(tiny_model("qwen3_moe")))
    ids = mx.array([tokenizer.encode("The train leaves the station at nine and the fox")])
    layer = model.model.layers[0]
    x = layer.input_layernorm(model.model.embed_tokens(ids))
    logits = layer.mlp.gate(x)[0]
    top = mx.argpartition(logits, kth=-layer.mlp.top_k, axis=-1)[:, -layer.mlp.top_k :]
    sets = {tuple(sorted(t)) for t in top.tolist()}
    assert len(sets) > ids.shape[1] // 2
    assert len(set(mx.flatten(top).tolist())) >= layer.mlp.num_experts // 2


def test_seed_reproducible(tmp_path, tiny_model):
    a = make_model(tmp_path / "a", "qwen3_moe", seed=0, progress=False)
    b = make_model(tmp_path / "b", "qwen3_moe", seed=1, progress=False)
    assert _hash_shards(tiny_model("qwen3_moe")) == _hash_shards(tmp_path / "a")
    assert _hash_shards(tmp_path / "a") != _hash_shards(tmp_path / "b")
    for name in ("tokenizer.json", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a["shards"] == b["shards"]


def test_chunking_does_not_change_bytes(tmp_path, monkeypatch, tiny_model):
    # One expert per chunk must write the same bytes as the default chunks.
    monkeypatch.setattr(synthetic, "_CHUNK_BYTES", 1)
    make_model(tmp_path / "m", "mixtral", progress=True)
    assert _hash_shards(tiny_model("mixtral")) == _hash_shards(tmp_path / "m")


def test_matches_mlx_save_safetensors(tmp_path, tiny_model):
    # Re-saving a shard with MLX gives the same header, up to the data order
    # (MLX's is a hash map's), and as many data bytes.
    shard = _shards(tiny_model("qwen3_5_moe"))[0]
    ref = tmp_path / "ref.safetensors"
    mx.save_safetensors(str(ref), mx.load(str(shard)), metadata={"format": "mlx"})

    def header(f):
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        h = json.loads(raw[8 : 8 + n])
        data_bytes = len(raw) - 8 - n
        return data_bytes, list(h), [
            v if k == "__metadata__" else (v["dtype"], v["shape"]) for k, v in h.items()
        ]

    assert header(shard) == header(ref)


@pytest.mark.parametrize("arch", ["qwen3_5_moe", "mixtral"])
def test_bfloat16(tiny_model, arch):
    path = tiny_model(arch, "bfloat16")
    model, tokenizer = mlx_lm.load(str(path))
    params = dict(tree_flatten(model.parameters()))
    expert_key, _ = EXPECTED_KEYS[arch]
    prefix = expert_key.rsplit(".", 1)[0]
    assert params[f"{prefix}.scales"].dtype == mx.bfloat16
    assert params[f"{prefix}.biases"].dtype == mx.bfloat16
    norms = [v for k, v in params.items() if k.endswith("input_layernorm.weight")]
    assert all(v.dtype == mx.bfloat16 for v in norms)
    if arch == "qwen3_5_moe":
        # cast_predicate keeps A_log in float32.
        assert params["language_model.model.layers.0.linear_attn.A_log"].dtype == mx.float32
    out = mlx_lm.generate(model, tokenizer, prompt="Hello", max_tokens=4)
    assert isinstance(out, str)


def test_size_scaling(tmp_path):
    base = make_model(tmp_path / "base", "qwen3_moe", progress=False)
    big = make_model(tmp_path / "big", "qwen3_moe", size_gb=0.05, progress=False)
    target = 0.05 * GB
    assert abs(big["total_bytes"] - target) < 0.05 * target
    assert _num_experts(big["config"]) > _num_experts(base["config"])
    assert big["expert_bytes"] + big["non_expert_bytes"] == big["total_bytes"]
    assert big["total_bytes"] == json.loads(
        (tmp_path / "big" / "model.safetensors.index.json").read_text()
    )["metadata"]["total_size"]


def test_size_scaling_adds_layers():
    # Past MAX_EXPERTS the layer count grows instead (checked on lazy models).
    config = synthetic._scale_to_size("qwen3_5_moe", "med", 40 * GB, "bfloat16")
    tc = config["text_config"]
    assert tc["num_experts"] <= synthetic.MAX_EXPERTS
    assert tc["num_hidden_layers"] % tc["full_attention_interval"] == 0
    size = synthetic._model_nbytes(config, "bfloat16")
    assert abs(size - 40 * GB) < 0.05 * 40 * GB


def test_peak_memory_bounded(tmp_path):
    # Write a 256 MiB checkpoint in a fresh process; its peak RSS must grow by
    # much less than the checkpoint size.
    script = textwrap.dedent(f"""
        import psutil
        from moed.daemon.tools import synthetic
        from moed.daemon.engine.generate import peak_rss_bytes
        before = psutil.Process().memory_info().rss
        synthetic.make_model({str(tmp_path / "m")!r}, "mixtral", "small", size_gb=0.25, progress=False)
        peak = peak_rss_bytes()
        print((peak - before) // (1 << 20))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    growth_mb = int(out.stdout.strip().splitlines()[-1])
    size_mb = sum(f.stat().st_size for f in (tmp_path / "m").iterdir()) // MB
    assert size_mb > 200
    assert growth_mb < 150, (growth_mb, size_mb)
