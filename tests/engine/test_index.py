"""The expert index: headers only, byte ranges that hold the real bytes, clear errors."""

import json
import shutil
import struct

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model

from moed.daemon.engine.checkpoint import resolve_model
from moed.daemon.engine.index import CheckpointError, TensorTable
from moed.daemon.engine.loader import load_paged
from moed.daemon.engine.modules import find_switches


def expert_layers(path):
    net, _ = load_model(path, lazy=True)
    table = TensorTable(path)
    return table, [(p, m, table.expert_layer(p, {k: v.shape for k, v in tree_flatten(m.parameters())}))
                   for p, m in find_switches(net)]


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3_5_moe", "mixtral"])
def test_ranges_hold_each_experts_bytes(arch, tiny_models):
    path = tiny_models[arch]
    table, layers = expert_layers(path)
    assert len(table.files) >= 2
    for p, m, layer in layers[:2]:
        for e in (0, layer.num_experts - 1):
            for t, (fi, off, n) in zip(layer.tensors, layer.ranges(e)):
                with open(table.files[fi], "rb") as f:
                    f.seek(off)
                    got = f.read(n)
                want = dict(tree_flatten(m.parameters()))[t.param][e]
                if want.dtype == mx.bfloat16:
                    want = want.view(mx.uint16)
                assert got == np.array(want).tobytes(), f"{p}.{t.param}[{e}]"


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def rewrite_header(shard, edit):
    """Apply edit(header_dict) to a shard's safetensors header, keeping the data."""
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new)) if len(new) <= n else b""
    assert len(new) == n, "header edit must not grow the header"
    shard.write_bytes(raw[:8] + new + raw[8 + n :])


def shard_of(path, suffix):
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    key = next(k for k in index if k.endswith(suffix))
    return key, path / index[key]


def test_missing_expert_tensor_is_named(tiny_models, tmp_path):
    path = copy_model(tiny_models["qwen3_moe"], tmp_path / "m")
    key, shard = shard_of(path, "switch_mlp.up_proj.scales")
    rewrite_header(shard, lambda h: h.__setitem__(key.replace("up_proj", "uX_proj"), h.pop(key)))
    with pytest.raises(CheckpointError, match="(?s)cannot load.*not in model.*switch_mlp.uX_proj.scales"):
        load_paged(path)


def test_wrong_shape_is_named(tiny_models, tmp_path):
    path = copy_model(tiny_models["qwen3_moe"], tmp_path / "m")
    key, shard = shard_of(path, "switch_mlp.down_proj.weight")

    def edit(h):
        e, *rest = h[key]["shape"]
        h[key]["shape"] = [e // 2, rest[0], rest[1] * 2]

    rewrite_header(shard, edit)
    with pytest.raises(CheckpointError, match="(?s)cannot load.*shape.*switch_mlp.down_proj.weight"):
        load_paged(path)


def test_unsupported_dtype_and_truncation_are_named(tiny_models, tmp_path):
    path = copy_model(tiny_models["mixtral"], tmp_path / "m")
    key, shard = shard_of(path, "switch_mlp.gate_proj.biases")
    rewrite_header(shard, lambda h: h[key].__setitem__("dtype", "Q4"))
    with pytest.raises(CheckpointError, match=f"{key} has unsupported dtype Q4"):
        TensorTable(path)
    path2 = copy_model(tiny_models["mixtral"], tmp_path / "m2")
    _, shard2 = shard_of(path2, "switch_mlp.gate_proj.biases")
    with open(shard2, "r+b") as f:
        f.truncate(shard2.stat().st_size - 100)
    with pytest.raises(CheckpointError, match="truncated"):
        TensorTable(path2)


def test_model_resolution(tiny_models, tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    snap = hub / "models--acme--tiny-moe" / "snapshots" / "abc123"
    snap.parent.mkdir(parents=True)
    snap.symlink_to(tiny_models["qwen3_moe"], target_is_directory=True)
    (hub / "models--acme--tiny-moe" / "refs").mkdir()
    (hub / "models--acme--tiny-moe" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert resolve_model("acme/tiny-moe") == snap
    with pytest.raises(CheckpointError, match="not found .*looked in.*models--acme--absent"):
        resolve_model("acme/absent")
    with pytest.raises(CheckpointError, match="not found"):
        resolve_model(str(tmp_path / "nowhere"))
