"""Expert index: safetensors headers -> the byte ranges of every (layer, expert).

Only the headers are read (8-byte length + JSON), never tensor data. In an mlx-lm checkpoint the
experts of a layer are stacked: `<layer>.switch_mlp.<proj>.<param>` with a leading num_experts
dimension, so expert e of a tensor is the contiguous slice [e * per_expert, (e + 1) * per_expert).
A packed store (`moed pack`, daemon/pack.py) moves each expert's slices into one contiguous record;
when its index matches the checkpoint the table serves the expert tensors from it instead.
No MLX import: the workers and the planner read this too.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path

# safetensors dtype -> bytes per element
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}
FLOATS = {"F32", "F16", "BF16"}  # the floating dtypes (what --dtype casts)
MAX_HEADER_BYTES = 100 << 20
PACK_DIR, PACK_INDEX = "moed-pack", "index.json"
PAGE = 4096  # packed records start on page boundaries (O_DIRECT's alignment too)


class CheckpointError(ValueError):
    """The checkpoint cannot be paged; the message names what is wrong."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file_idx: int
    offset: int  # absolute file offset of the first byte
    nbytes: int
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ExpertTensor:
    """One stacked expert tensor of one layer, e.g. `gate_proj.weight`."""

    param: str  # path relative to the switch module, e.g. "gate_proj.weight"
    info: TensorInfo
    stride: int = 0  # bytes from one expert's slice to the next; 0: stacked (expert_nbytes)

    @property
    def num_experts(self) -> int:
        return self.info.shape[0]

    @property
    def expert_shape(self) -> tuple[int, ...]:
        return self.info.shape[1:]

    @property
    def expert_nbytes(self) -> int:
        return self.info.nbytes // self.num_experts

    def expert_range(self, expert: int) -> tuple[int, int, int]:
        """(file_idx, offset, length) of one expert's slice."""
        n = self.expert_nbytes
        return self.info.file_idx, self.info.offset + expert * (self.stride or n), n


@dataclass(frozen=True)
class ExpertLayer:
    """The expert tensors of one switch module (one MoE layer)."""

    path: str  # module path, e.g. "model.layers.3.mlp.switch_mlp"
    tensors: tuple[ExpertTensor, ...]
    crc32: tuple[int, ...] = ()  # packed: each expert record's checksum (`moed pack`); (): none to check
    crc_order: tuple[int, ...] = ()  # the tensors in record order (the checksum runs over the record's bytes)

    @property
    def num_experts(self) -> int:
        return self.tensors[0].num_experts

    @property
    def expert_nbytes(self) -> int:
        return sum(t.expert_nbytes for t in self.tensors)

    def ranges(self, expert: int) -> list[tuple[int, int, int]]:
        return [t.expert_range(expert) for t in self.tensors]

    def record_ok(self, expert: int, views: Sequence) -> bool:
        """Whether an expert's bytes as read (one view per tensor, in `tensors` order) match its
        record's checksum in the pack; True when the layer has none."""
        if not self.crc32:
            return True
        crc = 0
        for j in self.crc_order:
            crc = zlib.crc32(views[j], crc)
        return crc == self.crc32[expert]


def read_header(path: Path, file_idx: int = 0) -> dict[str, TensorInfo]:
    """Parse one safetensors header into TensorInfo records (absolute offsets)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: safetensors header of {n} bytes is implausible")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    size = path.stat().st_size
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype, shape = meta["dtype"], tuple(meta["shape"])
        if dtype not in DTYPE_BYTES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        start, end = meta["data_offsets"]
        if end - start != prod(shape) * DTYPE_BYTES[dtype] or base + end > size:
            raise CheckpointError(f"{path}: tensor {name} has inconsistent or truncated data")
        out[name] = TensorInfo(name, file_idx, base + start, end - start, dtype, shape)
    return out


def shard_files(model_dir: Path) -> list[Path]:
    """The checkpoint's shards: those of model.safetensors.index.json, else model*.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / n for n in names]
    else:
        files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no model*.safetensors shards")
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{model_dir}: shards named in the index are missing: {missing}")
    return files


def source_fingerprint(files: list[Path]) -> list[dict]:
    """What a pack was made from: each shard's name, size, times, inode and a checksum of its header.

    The change time and inode catch a shard rewritten while keeping its size and mtime (`cp -p`,
    `tar x`, a rename over it): neither can be set back by a user. Copying the whole model directory
    therefore makes its pack stale too, which is refused (and `moed pack` rebuilds it), never used.
    """
    out = []
    for f in files:
        st = f.stat()
        out.append({"file": f.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
                    "ino": st.st_ino, "header_crc32": _header_crc32(f)})
    return out


def _header_crc32(path: Path) -> int:
    with open(path, "rb") as fh:
        raw = fh.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
        return zlib.crc32(raw + fh.read(min(n, 100 << 20)))


def pack_member(pack_dir: Path, name: object) -> Path:
    """`pack_dir / name` for a name from a pack index, refused unless it is a plain file name inside the pack."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise ValueError(f"pack index names a file outside {pack_dir}: {name!r}")
    f = pack_dir / name
    if f.resolve().parent != pack_dir.resolve():
        raise ValueError(f"pack index names a file outside {pack_dir}: {name!r} (a link to {f.resolve()})")
    return f


class TensorTable:
    """Every tensor of a checkpoint, from the headers of all its shards (and its pack, if current).

    Args:
        model_dir: the checkpoint directory.
        packed: serve expert tensors from `<model_dir>/moed-pack` when it matches the shards.
    """

    def __init__(self, model_dir: str | Path, packed: bool = True):
        self.model_dir = Path(model_dir)
        self.files = shard_files(self.model_dir)
        self.tensors: dict[str, TensorInfo] = {}
        for i, f in enumerate(self.files):
            self.tensors.update(read_header(f, i))
        self.packed: dict[str, tuple[TensorInfo, int]] = {}  # tensor name -> (its place in the pack, stride)
        self.pack_crc32: dict[int, tuple[int, ...]] = {}  # pack file index -> its records' checksums
        self.pack_note = ""  # why a pack present was not used
        if packed and (self.model_dir / PACK_DIR / PACK_INDEX).exists():
            self._use_pack(self.model_dir / PACK_DIR)

    def _use_pack(self, pack_dir: Path) -> None:
        try:
            index = json.loads((pack_dir / PACK_INDEX).read_text())
            now = source_fingerprint(self.files)
            if index.get("source") != now:
                was = {s.get("file"): s for s in index.get("source") or [] if isinstance(s, dict)}
                changed = [s["file"] for s in now if was.get(s["file"]) != s] or ["the list of shards"]
                raise ValueError(f"the checkpoint changed since `moed pack` ({', '.join(changed)}); "
                                 "run `moed pack` again")
            files, packed, crcs = [], {}, {}
            for entry in index["layers"]:
                f = pack_member(pack_dir, entry["file"])
                if f.stat().st_size < entry["stride"] * entry["num_experts"]:
                    raise ValueError(f"{f.name} is truncated")
                if len(entry.get("crc32") or ()) != entry["num_experts"]:
                    raise ValueError(f"{f.name} has no record checksums (packed by an older moed): run `moed pack` again")
                files.append(f)
                crcs[len(self.files) + len(files) - 1] = tuple(int(c) for c in entry["crc32"])
                for t in entry["tensors"]:
                    src = self.tensors[t["name"]]
                    info = TensorInfo(src.name, len(self.files) + len(files) - 1, t["offset"], src.nbytes,
                                      src.dtype, src.shape)
                    packed[t["name"]] = (info, entry["stride"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.pack_note = f"{pack_dir} not used: {e}"
            return
        self.files += files
        self.packed, self.pack_crc32 = packed, crcs

    def expert_layer(self, path: str, params: dict[str, tuple[int, ...]]) -> ExpertLayer:
        """Map one switch module's expert parameters to their tensors, validating shapes.

        Args:
            path: module path of the switch layer, e.g. "model.layers.0.mlp.switch_mlp".
            params: expected parameter shapes (leading num_experts dim), keyed by relative
                name such as "gate_proj.weight", as the model built from config.json has them.
        """
        tensors = []
        for param, shape in params.items():
            name = f"{path}.{param}"
            info = self.tensors.get(name)
            if info is None:
                hint = ""
                if any(".experts.0." in k for k in self.tensors):
                    hint = " (experts are stored unstacked, one tensor per expert: convert with mlx_lm.convert)"
                raise CheckpointError(f"{self.model_dir}: missing expert tensor {name}{hint}")
            if tuple(info.shape) != tuple(shape):
                raise CheckpointError(
                    f"{self.model_dir}: expert tensor {name} has shape {list(info.shape)}, "
                    f"the config implies {list(shape)}"
                )
            tensors.append(ExpertTensor(param, *self.packed[name]) if name in self.packed else ExpertTensor(param, info))
        counts = {t.num_experts for t in tensors}
        if len(counts) != 1:
            raise CheckpointError(f"{self.model_dir}: {path} tensors disagree on the expert count")
        return ExpertLayer(path, tuple(tensors), *self._record_checks(tensors))

    def _record_checks(self, tensors: list[ExpertTensor]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(checksums, record order) of a layer whose tensors tile one pack file's records, else ((), ())."""
        files = {t.info.file_idx for t in tensors}
        crcs = self.pack_crc32.get(next(iter(files))) if len(files) == 1 and all(t.stride for t in tensors) else None
        if not crcs:
            return (), ()
        order = sorted(range(len(tensors)), key=lambda j: tensors[j].info.offset)
        at = 0
        for j in order:  # back to back from the record's start, as `moed pack` wrote them
            if tensors[j].info.offset != at:
                return (), ()
            at += tensors[j].expert_nbytes
        return crcs, tuple(order)
