"""`moed pack DIR`: repack a checkpoint's experts into one contiguous, page-aligned record each.

In an mlx-lm checkpoint an expert is scattered over its layer's stacked tensors (gate/up/down x
weight/scales/biases: 9 slices in different places), so a miss costs 9 reads. Packed (Flash-MoE's
layout), each MoE layer is one file `DIR/moed-pack/layer-NNN.bin` holding expert e's slices back to
back at offset e * stride, stride a multiple of the page size: one read per expert, aligned for
O_DIRECT. `index.json` maps each tensor into the records and fingerprints the source shards; the
engine uses a pack whose fingerprint matches (workers/index.py) and ignores a stale one.
The original files are left untouched: mlx-lm still loads the non-expert weights from them.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from moed.daemon.engine.index import PACK_DIR, PACK_INDEX, PAGE, ExpertLayer, source_fingerprint

BLOCK_BYTES = 64 << 20  # records assembled per write


def _records(layer: ExpertLayer, fds: list[int], e0: int, e1: int, stride: int) -> np.ndarray:
    """Experts [e0, e1) of a layer as packed records, read from the source shards."""
    out = np.zeros((e1 - e0, stride), np.uint8)
    at = 0
    for t in layer.tensors:
        n = t.expert_nbytes
        f, off, _ = t.expert_range(e0)
        raw = os.pread(fds[f], n * (e1 - e0), off)
        if len(raw) != n * (e1 - e0):
            raise OSError(f"short read of {t.info.name}")
        out[:, at:at + n] = np.frombuffer(raw, np.uint8).reshape(e1 - e0, n)
        at += n
    return out


def pack(model: str | Path, progress: Callable[[str, float], None] | None = None) -> dict:
    """Write `<model>/moed-pack/` and verify it; returns a summary."""
    from moed.daemon.engine.checkpoint import expert_index, resolve_model

    report = progress or (lambda phase, done: None)
    path = resolve_model(model)
    table, layers, _ = expert_index(path, packed=False)
    out_dir = path / PACK_DIR
    out_dir.mkdir(exist_ok=True)
    (out_dir / PACK_INDEX).unlink(missing_ok=True)  # a half-written pack must never be used
    fds = [os.open(f, os.O_RDONLY) for f in table.files]
    total = sum(layer.expert_nbytes * layer.num_experts for layer in layers)
    done = 0
    index = {"format": "moed-pack", "version": 1, "page": PAGE, "source": source_fingerprint(table.files),
             "layers": []}
    try:
        for i, layer in enumerate(layers):
            record = layer.expert_nbytes
            stride = -(-record // PAGE) * PAGE
            block = max(1, BLOCK_BYTES // stride)
            name = f"layer-{i:03d}.bin"
            fd = os.open(out_dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            crcs: list[int] = []
            try:
                for e0 in range(0, layer.num_experts, block):
                    e1 = min(layer.num_experts, e0 + block)
                    records = _records(layer, fds, e0, e1, stride)
                    crcs += [zlib.crc32(r[:record]) for r in records]
                    os.pwrite(fd, records.tobytes(), e0 * stride)
                    done += (e1 - e0) * record
                    report(f"packing layer {i + 1}/{len(layers)}", 0.9 * done / total)
                os.fsync(fd)
            finally:
                os.close(fd)
            tensors, at = [], 0
            for t in layer.tensors:
                tensors.append({"name": t.info.name, "offset": at, "nbytes": t.expert_nbytes})
                at += t.expert_nbytes
            index["layers"].append({"path": layer.path, "file": name, "stride": stride,
                                    "num_experts": layer.num_experts, "tensors": tensors, "crc32": crcs})
        report("verifying", 0.9)
        bad = verify(layers, fds, out_dir, index)
        if bad:
            raise OSError(f"the packed copy differs from the checkpoint: {bad}")
    finally:
        for fd in fds:
            os.close(fd)
    tmp = out_dir / (PACK_INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    tmp.rename(out_dir / PACK_INDEX)  # the pack exists only once it is complete and verified
    report("done", 1.0)
    return {"dir": str(out_dir), "layers": len(layers), "expert_bytes": total,
            "packed_bytes": sum(entry["stride"] * entry["num_experts"] for entry in index["layers"])}


def check(model: str | Path) -> list[str]:
    """Re-read a pack's records and compare each with its checksum in index.json; returns the bad ones."""
    from moed.daemon.engine.checkpoint import resolve_model
    from moed.daemon.engine.index import pack_member

    pack_dir = resolve_model(model) / PACK_DIR
    index = json.loads((pack_dir / PACK_INDEX).read_text())
    bad = []
    for entry in index["layers"]:
        stride, crcs = entry["stride"], entry.get("crc32") or []
        record = sum(t["nbytes"] for t in entry["tensors"])
        if len(crcs) != entry["num_experts"]:
            bad.append(f"{entry['file']}: no checksums (packed by an older moed)")
            continue
        fd = os.open(pack_member(pack_dir, entry["file"]), os.O_RDONLY)
        try:
            for e, want in enumerate(crcs):
                if zlib.crc32(os.pread(fd, record, e * stride)) != want:
                    bad.append(f"{entry['file']} expert {e}")
        finally:
            os.close(fd)
    return bad


def verify(layers: list[ExpertLayer], fds: list[int], out_dir: Path, index: dict) -> list[str]:
    """Re-read every packed record and compare it with the source slices; returns mismatches."""
    bad = []
    for layer, entry in zip(layers, index["layers"]):
        stride = entry["stride"]
        block = max(1, BLOCK_BYTES // stride)
        fd = os.open(out_dir / entry["file"], os.O_RDONLY)
        try:
            for e0 in range(0, layer.num_experts, block):
                e1 = min(layer.num_experts, e0 + block)
                want = _records(layer, fds, e0, e1, stride)
                got = np.frombuffer(os.pread(fd, want.nbytes, e0 * stride), np.uint8)
                if got.nbytes != want.nbytes or not np.array_equal(got.reshape(want.shape), want):
                    bad.append(f"{entry['file']} experts {e0}-{e1 - 1}")
        finally:
            os.close(fd)
    return bad
