"""`moed pack`: page-aligned records, one read per expert, same tokens; stale packs are ignored."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from moed.daemon.engine.checkpoint import expert_index
from moed.daemon.engine.generate import SamplingParams, run
from moed.daemon.engine.index import PACK_DIR, PACK_INDEX, PAGE
from moed.daemon.engine.loader import load_paged, load_resident
from moed.daemon.tools.pack import pack
from moed.workers.reader import Reader, plan

PROMPT = "Once upon a time, in a land of small memories and large models,"


@pytest.fixture(params=["qwen3_moe", "qwen3_5_moe"])
def packed_model(request, tiny_model, tmp_path):
    path = tmp_path / request.param
    shutil.copytree(tiny_model(request.param), path)
    pack(path)
    return path


def test_each_expert_is_one_aligned_read(packed_model):
    _, stacked, _ = expert_index(packed_model, packed=False)
    table, layers, _ = expert_index(packed_model)
    assert table.packed and not table.pack_note
    for layer, src in zip(layers, stacked):
        assert len(layer.tensors) > 1  # several tensors per expert...
        for e in (0, 1, layer.num_experts - 1):
            runs = plan([(f, off, n, 0) for f, off, n in layer.ranges(e)])
            assert len(runs) == 1 and runs[0].offset % PAGE == 0  # ...read with one aligned preadv
            assert len(plan([(f, off, n, 0) for f, off, n in src.ranges(e)])) > 1  # unpacked: one per tensor
            # and the record holds exactly the source bytes
            got, want = bytearray(layer.expert_nbytes), bytearray(src.expert_nbytes)
            Reader([str(f) for f in table.files]).read(memoryview(got), _dense(layer.ranges(e)))
            Reader([str(f) for f in table.files]).read(memoryview(want), _dense(src.ranges(e)))
            assert got == want


def _dense(ranges):
    out, at = [], 0
    for f, off, n in ranges:
        out.append((f, off, n, at))
        at += n
    return out


def test_packed_tokens_equal_mlx_lm(packed_model):
    net, tok = load_resident(packed_model)
    want = run(net, tok, PROMPT, SamplingParams(max_tokens=32))
    with load_paged(packed_model, cache_fraction=0.25, workers=2) as pm:
        assert pm.info["packed"]
        got = run(pm.model, pm.tokenizer, PROMPT, SamplingParams(max_tokens=32))
        assert pm.store.stats.misses > 0  # experts were read from the pack
    assert got.tokens == want.tokens
    np.testing.assert_allclose(np.array(got.logprobs), np.array(want.logprobs), atol=1e-5)


def test_stale_or_partial_pack_is_not_used(packed_model):
    shard = next(packed_model.glob("model*.safetensors"))
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # the checkpoint changed
    table, _, _ = expert_index(packed_model)
    assert not table.packed and "changed since" in table.pack_note
    with load_paged(packed_model, cache_fraction=0.5, workers=1) as pm:
        assert not pm.info["packed"]
    (packed_model / PACK_DIR / PACK_INDEX).unlink()  # a pack without its index (interrupted) is ignored
    table, _, _ = expert_index(packed_model)
    assert not table.packed and not table.pack_note
