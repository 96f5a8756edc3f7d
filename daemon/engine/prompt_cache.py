"""The prompt cache: the KV (and recurrent state) of prompt prefixes, reused across requests and clients.

In memory it is mlx-lm's own LRUPromptCache (a trie of token ids, LRU per kind, bounded in bytes):
a trimmable cache (attention only) serves any shorter common prefix by trimming; a hybrid one
(Gated-DeltaNet layers, which cannot be trimmed) is reused only where an entry is a prefix of the
new prompt, so the core checkpoints where a reuse is likely (the end of the system prompt, the start
of the last message, the prompt less its last token) and keeps each finished request's whole
sequence (prompt + completion).

On disk (`--prompt-cache-dir`), long prefixes are kept with mlx-lm's save_prompt_cache under a
folder named by the model's fingerprint: after a restart, an agent's first call reuses its system
prompt. A file is trusted only if its name's checksum matches its bytes and its metadata names this
model and format; anything else is ignored with a log line (removed if corrupt).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import LRUPromptCache, load_prompt_cache, save_prompt_cache

from moed.ipc.messages import PromptCacheStatus

log = logging.getLogger(__name__)

FORMAT = "moed-prompt-cache-1"
PERSIST_MIN_TOKENS = 256  # shorter prefixes are cheap to prefill again: not worth a file
KINDS = ("system", "user", "assistant")  # where an entry ends: system prompt, prompt, whole sequence


def model_fingerprint(model_dir: str | Path, *extra: str) -> str:
    """What a cached KV depends on: the checkpoint's config and tensor layout (each shard's name,
    size and safetensors header), mlx-lm's version, and `extra` (e.g. a top-k override). Cheap: no
    tensor data is read."""
    import mlx_lm

    root = Path(model_dir)
    h = hashlib.sha256(FORMAT.encode())
    h.update(mlx_lm.__version__.encode())
    for x in extra:
        h.update(b"\0" + x.encode())
    cfg = root / "config.json"
    if cfg.exists():
        h.update(cfg.read_bytes())
    for shard in sorted(root.glob("*.safetensors")):
        with open(shard, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            h.update(shard.name.encode() + shard.stat().st_size.to_bytes(8, "little") + f.read(min(n, 1 << 26)))
    return h.hexdigest()[:32]


DEFAULT_SHARE = 0.10  # of the memory left once the model is loaded
DEFAULT_MIN, DEFAULT_MAX = 256 << 20, 4 << 30


def default_bytes(model_bytes: int, total_memory: int | None = None) -> int:
    """The in-memory prompt cache when `--prompt-cache-gb` is not given (what `moed plan` shows):
    a tenth of the memory left beside the resident weights and the expert cache, in [256 MB, 4 GB]."""
    if total_memory is None:
        import psutil

        total_memory = psutil.virtual_memory().total
    return int(min(DEFAULT_MAX, max(DEFAULT_MIN, DEFAULT_SHARE * (total_memory - model_bytes))))


@dataclass
class DiskEntry:
    tokens: tuple[int, ...]
    path: Path
    nbytes: int


class DiskPrefixes:
    """Long prompt prefixes (`min_tokens` or more) as safetensors files in `root/<fingerprint>/`,
    bounded in bytes (least recently used files go first)."""

    def __init__(self, root: str | Path, fingerprint: str, max_bytes: int, min_tokens: int = PERSIST_MIN_TOKENS):
        self.root, self.fingerprint, self.max_bytes, self.min_tokens = Path(root), fingerprint, max_bytes, min_tokens
        self.dir = self.root / fingerprint
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.entries: dict[tuple[int, ...], DiskEntry] = {}
        self.hits = self.saves = self.refused = 0
        others = [p.name for p in self.root.iterdir() if p.is_dir() and p.name != fingerprint]
        if others:
            log.info("prompt cache: ignoring %d folder(s) of other models or versions in %s", len(others), root)
        for path in sorted(self.dir.glob("*.safetensors")):
            self._index(path)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def _index(self, path: Path) -> None:
        """Read a file's metadata (its header only); refuse what is not this model's."""
        try:
            meta = _header_metadata(path)
            if meta.get("0.format") != FORMAT or meta.get("0.model") != self.fingerprint:
                log.info("prompt cache: ignoring %s (another model or format)", path.name)
                return
            tokens = tuple(json.loads(meta["0.tokens"]))
        except (OSError, ValueError, KeyError) as e:
            self._refuse(path, f"unreadable ({e})")
            return
        self.entries[tokens] = DiskEntry(tokens, path, path.stat().st_size)

    def _refuse(self, path: Path, why: str) -> None:
        self.refused += 1
        log.warning("prompt cache: removing %s: %s", path, why)
        path.unlink(missing_ok=True)
        self.entries = {k: e for k, e in self.entries.items() if e.path != path}

    def longest(self, ids: list[int]) -> DiskEntry | None:
        """The longest entry that is a prefix of `ids`."""
        best = None
        for tokens, e in self.entries.items():
            if len(tokens) <= len(ids) and (best is None or len(tokens) > len(best.tokens)) \
                    and tuple(ids[:len(tokens)]) == tokens:
                best = e
        return best

    def load(self, e: DiskEntry) -> list | None:
        """The entry's cache, or None (and the file removed) if its bytes are not what was saved."""
        try:
            data = e.path.read_bytes()
            if f"{zlib.crc32(data):08x}" != e.path.stem.rsplit("-", 1)[-1]:
                raise ValueError("checksum mismatch")
            cache, meta = load_prompt_cache(str(e.path), return_metadata=True)
            if meta.get("model") != self.fingerprint or tuple(json.loads(meta["tokens"])) != e.tokens:
                raise ValueError("metadata does not match")
        except Exception as exc:  # a corrupt file is never trusted
            self._refuse(e.path, str(exc))
            return None
        os.utime(e.path)  # recently used: evicted last
        self.hits += 1
        return cache

    def save(self, tokens: list[int], cache: list) -> None:
        key = tuple(tokens)
        if key in self.entries:
            os.utime(self.entries[key].path)
            return
        name = hashlib.sha1(json.dumps(tokens).encode()).hexdigest()[:24]
        tmp = self.dir / f".{name}.tmp.safetensors"
        mx.eval([c.state for c in cache])
        save_prompt_cache(str(tmp), cache, {"format": FORMAT, "model": self.fingerprint, "tokens": json.dumps(tokens)})
        path = self.dir / f"{name}-{zlib.crc32(tmp.read_bytes()):08x}.safetensors"
        os.replace(tmp, path)
        self.entries[key] = DiskEntry(key, path, path.stat().st_size)
        self.saves += 1
        self._evict()

    def _evict(self) -> None:
        while self.entries and self.nbytes > self.max_bytes:
            oldest = min(self.entries.values(), key=lambda e: e.path.stat().st_mtime)
            oldest.path.unlink(missing_ok=True)
            del self.entries[oldest.tokens]


def _header_metadata(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n < 1 << 26:
            raise ValueError("not a safetensors file")
        return json.loads(f.read(n)).get("__metadata__") or {}


class PromptCache:
    """Reusable prefixes for one loaded model: fetch the longest for a prompt, insert new ones.

    Args:
        max_bytes: the in-memory bound (LRU beyond it).
        fingerprint: the model's (model_fingerprint): entries of another model never match.
        disk: long prefixes on disk, or None.
    """

    def __init__(self, max_bytes: int, fingerprint: str, disk: DiskPrefixes | None = None):
        self.lru = LRUPromptCache(max_size=1 << 30, max_bytes=max_bytes)
        self.max_bytes, self.key, self.disk = max_bytes, fingerprint, disk
        self.lookups = self.hits = self.hit_tokens = self.looked_up_tokens = 0

    def fetch(self, ids: list[int]) -> tuple[list | None, int]:
        """(a copy of the cache of the longest reusable prefix, its length in tokens), or (None, 0).
        The prompt's last token is always left to prefill: it gives the first logits."""
        head = ids[:-1]
        cache, rest = self.lru.fetch_nearest_cache(self.key, head)
        n = len(head) - len(rest) if cache is not None else 0
        while self.disk is not None and (e := self.disk.longest(head)) is not None and len(e.tokens) > n:
            loaded = self.disk.load(e)  # None: refused and removed; the next longest is tried
            if loaded is not None:
                self.lru.insert_cache(self.key, list(e.tokens), loaded, cache_type="system")
                cache, rest = self.lru.fetch_nearest_cache(self.key, head)
                n = len(head) - len(rest) if cache is not None else 0
                break
        self.lookups += 1
        self.looked_up_tokens += len(ids)
        if n:
            self.hits += 1
            self.hit_tokens += n
        return cache, n

    def insert(self, tokens: list[int], cache: list, kind: str) -> None:
        """Keep `cache` (the state after `tokens`); long system/prompt prefixes also go to disk."""
        if not tokens:
            return
        if self.disk is not None and kind != "assistant" and len(tokens) >= self.disk.min_tokens:
            try:
                self.disk.save(list(tokens), cache)
            except OSError as e:
                log.warning("prompt cache: could not save a prefix to %s: %s", self.disk.dir, e)
        self.lru.insert_cache(self.key, list(tokens), cache, cache_type=kind)

    def clear(self) -> None:
        self.lru.trim_to(n_sequences=0)

    def status(self) -> PromptCacheStatus:
        d = self.disk
        return PromptCacheStatus(
            entries=len(self.lru), bytes=self.lru.nbytes, max_bytes=self.max_bytes, lookups=self.lookups,
            hits=self.hits, hit_tokens=self.hit_tokens, looked_up_tokens=self.looked_up_tokens,
            disk_dir=str(d.dir) if d else None, disk_entries=len(d.entries) if d else 0,
            disk_bytes=d.nbytes if d else 0, disk_hits=d.hits if d else 0, disk_refused=d.refused if d else 0)
