"""Pack integrity (issue 17, item 1): a stale pack is refused with the reason, paths stay inside the pack,
every record carries a crc32 that finds a corrupted record."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from moed.daemon.engine.checkpoint import expert_index
from moed.daemon.engine.index import PACK_DIR, PACK_INDEX
from moed.daemon.tools.pack import check, pack


@pytest.fixture
def packed_model(tiny_model, tmp_path):
    path = tmp_path / "qwen3_moe"
    shutil.copytree(tiny_model("qwen3_moe"), path)
    pack(path)
    return path


def _shard(path):
    return next(path.glob("model*.safetensors"))


def test_shard_rewritten_keeping_size_and_mtime_makes_the_pack_stale(packed_model):
    shard = _shard(packed_model)
    st = shard.stat()
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF  # new content, same size...
    shard.write_bytes(bytes(raw))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # ...and the old mtime, as `cp -p` / `tar x` leave it
    table, _, _ = expert_index(packed_model)
    assert not table.packed and "changed since" in table.pack_note and shard.name in table.pack_note


def test_shard_replaced_by_rename_makes_the_pack_stale(packed_model):
    shard = _shard(packed_model)
    st = shard.stat()
    tmp = shard.with_suffix(".new")
    shutil.copy2(shard, tmp)
    tmp.rename(shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    table, _, _ = expert_index(packed_model)
    assert not table.packed and shard.name in table.pack_note


@pytest.mark.parametrize("name", ["/etc/passwd", "../model.safetensors", "sub/../../x.bin", "..", ""])
def test_pack_index_paths_stay_inside_the_pack(packed_model, name):
    index_path = packed_model / PACK_DIR / PACK_INDEX
    index = json.loads(index_path.read_text())
    index["layers"][0]["file"] = name
    index_path.write_text(json.dumps(index))
    table, _, _ = expert_index(packed_model)
    assert not table.packed and "outside" in table.pack_note


def test_pack_index_symlink_out_of_the_pack_is_refused(packed_model, tmp_path):
    pack_dir = packed_model / PACK_DIR
    index = json.loads((pack_dir / PACK_INDEX).read_text())
    target = pack_dir / index["layers"][0]["file"]
    outside = tmp_path / "elsewhere.bin"
    shutil.copy(target, outside)
    target.unlink()
    target.symlink_to(outside)
    table, _, _ = expert_index(packed_model)
    assert not table.packed and "outside" in table.pack_note


def test_each_record_has_a_checksum_that_finds_corruption(packed_model):
    pack_dir = packed_model / PACK_DIR
    index = json.loads((pack_dir / PACK_INDEX).read_text())
    entry = index["layers"][1]
    assert len(entry["crc32"]) == entry["num_experts"]
    assert check(packed_model) == []
    with open(pack_dir / entry["file"], "r+b") as fh:  # flip one byte of expert 2's record
        fh.seek(2 * entry["stride"] + 5)
        b = fh.read(1)
        fh.seek(2 * entry["stride"] + 5)
        fh.write(bytes([b[0] ^ 0xFF]))
    assert check(packed_model) == [f"{entry['file']} expert 2"]


def _flip(path, offset):
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0xFF]))


def test_a_corrupt_record_is_refused_as_it_is_read_never_used(packed_model):
    """Issue 17: a corrupted `moed pack` record was used (wrong tokens). Corrupted after packing,
    before the load (the pins see the file as it was loaded): the read checks each record's crc32."""
    from moed.daemon.engine.experts import CorruptRecord
    from moed.daemon.engine.generate import SamplingParams, run
    from moed.daemon.engine.loader import load_paged

    params = SamplingParams(max_tokens=6, temp=0.0, ignore_eos=True)
    with load_paged(packed_model, cache_fraction=0.5, warm=False, warm_start=False) as pm:
        assert pm.info["packed"] and all(layer.crc32 for layer in pm.store.layers)
        clean = run(pm.model, pm.tokenizer, "hello", params)
        assert pm.store.stats.verify_seconds > 0
    entry = json.loads((packed_model / PACK_DIR / PACK_INDEX).read_text())["layers"][0]
    for e in range(entry["num_experts"]):  # every record of the first MoE layer: any miss there reads one
        _flip(packed_model / PACK_DIR / entry["file"], e * entry["stride"] + 7)
    with load_paged(packed_model, cache_fraction=0.5, warm=False, warm_start=False) as pm:
        for _ in range(2):  # and again: the failed experts were not left in their slots
            with pytest.raises(CorruptRecord, match=rf"{entry['file']}: expert record\(s\) .* fail their checksum"):
                run(pm.model, pm.tokenizer, "hello", params)
        assert pm.store.slots[0].used == 0
    with pytest.raises(CorruptRecord):  # a daemon's load (the cache is filled first) refuses it too
        load_paged(packed_model, cache_fraction=0.5, warm=True, warm_start=False).close()
    assert clean
