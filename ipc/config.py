"""The paging options, declared once: how big the expert cache is and how experts are read.

They travel: CLI flags -> `moed daemon` argv -> DaemonConfig -> `load_paged`, and to the bench's
subprocesses and every rank of a split model. Each field carries its flag and help, so a new option
is one field here; `add_args` makes the flags, `from_args` reads them back, `to_argv` writes them
again for a process re-run with the same configuration, `as_dict`/`from_dict` for JSON.

Here, under ipc/, because both sides need it: the CLI builds its parser with it without loading
the daemon or MLX (plain data and argparse, no imports of moed), and the engine loads with it.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import typing
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

DTYPES = ("float32",)  # casts `--dtype` offers (the loader maps each to its MLX dtype)
EVICTIONS = ("lru", "fwlru", "lfuda", "dlfu", "hotlru")  # the slot tables' policies (daemon/engine/slots.EVICTIONS)
KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _option(default: Any, flag: str, help: str, *, sizes: bool = False,
            valid: tuple[Callable[[Any], bool], str] | None = None, **argparse_kw: Any) -> Any:
    """A field with its flag and help. `sizes`: it sizes the cache (what `moed plan` takes);
    `valid`: (test of a set value, what it must be); `argparse_kw`: add_argument's type/action/choices."""
    return field(default=default, metadata={"flag": flag, "help": help, "sizes": sizes, "valid": valid,
                                            "argparse": argparse_kw})


class Options:
    """Options declared as dataclass fields made with `_option`: checked when built (each field
    against its annotation and its own test; a bad value raises ValueError naming the flag), and
    written to and read from command lines and JSON."""

    WHAT: ClassVar[str] = "these"  # for messages: "not paging options: ..."
    EXCLUSIVE: ClassVar[tuple[str, ...]] = ()  # fields of which at most one may be set

    def __post_init__(self) -> None:
        for f in fields(self):
            v, (kind, optional) = getattr(self, f.name), _kind(type(self), f.name)
            if v is None and optional:
                continue
            if kind is float and type(v) is int:  # JSON and Python write 1 for 1.0
                object.__setattr__(self, f.name, v := float(v))
            if type(v) is not kind:  # bool is no int here
                raise self._bad(f.name, v, f"must be {KINDS[kind]}" + (" or unset" if optional else ""))
            if f.metadata["valid"] is not None and not f.metadata["valid"][0](v):
                raise self._bad(f.name, v, f.metadata["valid"][1])
        if self.EXCLUSIVE and all(getattr(self, name) is not None for name in self.EXCLUSIVE):
            raise ValueError(f"give {' or '.join(self.flag_of(n) for n in self.EXCLUSIVE)}, not both")

    # ------------------------------------------------------------------ command lines

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser, only: Iterable[str] | None = None) -> None:
        """Add the flags (all, or the fields named in `only`) to `parser`, with their help and defaults."""
        names = None if only is None else set(only)
        if names is not None and (unknown := names - {f.name for f in fields(cls)}):
            raise ValueError(f"not {cls.WHAT} options: {', '.join(sorted(unknown))}")
        chosen = [f for f in fields(cls) if names is None or f.name in names]
        size = None  # --cache-fraction and --cache-gb: one way to size the cache
        for f in chosen:
            m, where = f.metadata, parser
            if f.name in cls.EXCLUSIVE:
                where = size = size or parser.add_mutually_exclusive_group()
            where.add_argument(m["flag"], dest=f.name, default=f.default, help=m["help"], **m["argparse"])
        parser.set_defaults(**{cls._added(): tuple(f.name for f in chosen)})  # what from_args reads back

    @classmethod
    def sizing(cls) -> tuple[str, ...]:
        """The fields that size the cache: what `moed plan` takes (it refuses the others' flags)."""
        return tuple(f.name for f in fields(cls) if f.metadata["sizes"])

    @classmethod
    def from_args(cls, ns: argparse.Namespace):
        """The configuration of flags that `add_args` added (the others keep their defaults: a verb's
        own option of the same name, such as the bench's `--lookahead` sweep, is not read)."""
        names = getattr(ns, cls._added(), None)
        if names is None:
            raise ValueError(f"{cls.__name__}.from_args: these arguments were not parsed with {cls.__name__}.add_args")
        return cls(**{name: getattr(ns, name) for name in names})

    def to_argv(self) -> list[str]:
        """Flags that parse back to this configuration (defaults are left out)."""
        out: list[str] = []
        for f in fields(self):
            v, m = getattr(self, f.name), f.metadata
            if v == f.default:
                continue
            action = m["argparse"].get("action")
            if action is argparse.BooleanOptionalAction:
                out.append(m["flag"] if v else "--no-" + m["flag"][2:])
            elif action in ("store_true", "store_false"):
                out.append(m["flag"])  # a switch differs from its default only one way
            else:
                out += [m["flag"], str(v)]
        return out

    # ------------------------------------------------------------------ JSON

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        names = {f.name for f in fields(cls)}
        if unknown := sorted(set(d) - names):
            raise ValueError(f"unknown {cls.WHAT} option(s): {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        return cls(**d)


    @classmethod
    def flag_of(cls, name: str) -> str:
        """The command-line flag of a field (errors name what the user typed)."""
        return next(f.metadata["flag"] for f in fields(cls) if f.name == name)

    @classmethod
    def _bad(cls, name: str, value: Any, why: str) -> ValueError:
        return ValueError(f"{cls.flag_of(name)} {why}, got {value!r}")

    @classmethod
    def _added(cls) -> str:
        """The parsed namespace's record of the fields add_args made flags for."""
        return f"{cls.__name__}_fields"


@dataclass(frozen=True)
class PagingConfig(Options):
    """The expert cache's size and how experts are read."""

    WHAT: ClassVar[str] = "paging"
    EXCLUSIVE: ClassVar[tuple[str, ...]] = ("cache_fraction", "cache_gb")  # two ways to size the cache

    cache_fraction: float | None = _option(
        None, "--cache-fraction", "share of each layer's experts kept in RAM (0-1]", sizes=True, type=float,
        valid=(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    cache_gb: float | None = _option(  # split evenly over the layers
        None, "--cache-gb", "expert cache budget in GB", sizes=True, type=float,
        valid=(lambda v: 0 < v < math.inf, "must be a positive number of GB"))
    workers: int = _option(2, "--workers", "I/O worker processes (default 2)", sizes=True, type=int,
                           valid=(lambda v: v >= 1, "must be at least 1"))
    dtype: str | None = _option(  # at load, and as experts are paged in
        None, "--dtype", "cast bf16/fp16 weights and scales to float32", sizes=True, choices=list(DTYPES),
        valid=(lambda v: v in DTYPES, f"must be one of {', '.join(DTYPES)}"))
    top_k: int | None = _option(None, "--top-k", "route each token to K experts instead of the model's top-k",
                                sizes=True, type=int, valid=(lambda v: v >= 1, "must be at least 1"))
    warm: bool = _option(True, "--no-warm", "start with an empty expert cache (default: fill it at load)",
                         action="store_false")
    warm_start: bool = _option(True, "--no-warm-start", "fill the cache at load in experts 0..n-1 order, not with the "
                               "experts the last runs used most (saved in the runtime dir: README)",
                               action="store_false")
    lookahead: bool | None = _option(  # None: moed.daemon.engine.budget.LOOKAHEAD_BELOW decides
        False, "--lookahead", "read the next layer's predicted experts while this layer computes (default: off; "
        "slower at a real model's recall, ~0.6: README)", action=argparse.BooleanOptionalAction)
    eviction: str = _option(  # fwlru: +4-7.5 points of hit rate at tight caches on realistic traces (README)
        "fwlru", "--eviction", "which expert a full layer cache drops: fwlru (fewest uses x 10 + last use, the "
        "default), lru, lfuda (LFU with dynamic aging), dlfu (decayed LFU) or hotlru (a pinned hot set + LRU)",
        choices=list(EVICTIONS),
        valid=(lambda v: v in EVICTIONS, f"must be one of {', '.join(EVICTIONS)}"))
    direct: bool = _option(False, "--direct", "read experts bypassing the page cache (O_DIRECT on Linux, "
                           "F_NOCACHE on macOS)", action="store_true")
    packed: bool = _option(True, "--no-pack", "read experts from the safetensors shards even if `moed pack` made "
                           "a packed store", action="store_false")


def parse_duration(text: str) -> float:
    """"30s", "5m", "1h", "90" (seconds), "-1" (forever) -> seconds; inf for forever (ollama's habit)."""
    t = str(text).strip().lower()
    scale = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    unit = next((u for u in ("ms", "s", "m", "h") if t.endswith(u)), "")
    try:
        v = float(t[: len(t) - len(unit)]) * scale.get(unit, 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 30s, 5m, 1h, -1 for forever)") from None
    return math.inf if v < 0 else v


@dataclass(frozen=True)
class ServingConfig(Options):
    """How the daemon schedules and remembers requests: batch and queue sizes, chunked prefill,
    the prompt cache (in memory and on disk) and how long an idle model stays loaded."""

    WHAT: ClassVar[str] = "serving"

    max_batch: int = _option(8, "--max-batch", "sequences decoded together (default 8)", type=int,
                             valid=(lambda v: v >= 1, "must be at least 1"))
    max_queue: int = _option(32, "--max-queue", "requests admitted before rejecting (default 32)", type=int,
                             valid=(lambda v: v >= 1, "must be at least 1"))
    max_client_requests: int = _option(
        32, "--max-client-requests", "requests one client may have running or queued; past it they are rejected "
        "(default 32; the HTTP API is one client: its requests count together)", type=int,
        valid=(lambda v: v >= 1, "must be at least 1"))
    prefill_chunk: int = _option(  # with nothing decoding a chunk costs no one a gap: the largest that bounds memory
        512, "--prefill-chunk", "prompt tokens prefilled per engine step with nothing else decoding, and the most "
        "per step while streams decode (default 512)", type=int, valid=(lambda v: v >= 1, "must be at least 1"))
    prefill_budget: float = _option(  # chosen by the contention bench (README "Serving: chats, agents, a second app")
        1.0, "--prefill-budget", "while streams decode, each step prefills for at most this many times its decode "
        "time (measured as the engine runs; default 1; 0: always --prefill-chunk tokens)", type=float,
        valid=(lambda v: 0 <= v < math.inf, "must be a number >= 0"))
    prompt_cache_gb: float | None = _option(
        None, "--prompt-cache-gb", "memory for reusable prompt prefixes (KV and recurrent state); 0 turns the "
        "prompt cache off (default: sized by `moed plan`)", type=float,
        valid=(lambda v: 0 <= v < math.inf, "must be a number of GB >= 0"))
    prompt_cache_dir: str | None = _option(
        None, "--prompt-cache-dir", "keep long prompt prefixes on disk here, across restarts", type=str)
    prompt_cache_disk_gb: float = _option(
        8.0, "--prompt-cache-disk-gb", "disk for --prompt-cache-dir (default 8)", type=float,
        valid=(lambda v: 0 < v < math.inf, "must be a positive number of GB"))
    kv_budget_gb: float | None = _option(  # daemon/engine/admission.py
        None, "--kv-budget-gb", "memory for running requests' KV cache and prefill activations: a request that "
        "does not fit waits for running ones to finish, one that never could is rejected (default: what is "
        "available once the model is loaded, less the prompt cache and the runtime)", type=float,
        valid=(lambda v: 0 < v < math.inf, "must be a positive number of GB"))
    keep_alive: float = _option(
        math.inf, "--keep-alive", "release the model's memory after this long idle, e.g. 5m (default: never); "
        "the next request loads it again", type=parse_duration,
        valid=(lambda v: v >= 0, "must be a duration >= 0"))


API_KEY_ENV = "MOED_API_KEY"


def api_key_of(a: argparse.Namespace) -> str | None:
    """The HTTP API key: `--api-key-file` or `--api-key` (with a warning: a command line is readable by
    every local user, in /proc/PID/cmdline and `ps`), else $MOED_API_KEY. `moed start` hands it to the
    daemon in that variable, never on its command line."""
    if a.api_key is not None and a.api_key_file is not None:
        raise ValueError("give --api-key-file or --api-key, not both")
    if a.api_key is not None:
        print(f"moed: warning: --api-key puts the key on the command line, where every local user can read it; "
              f"use --api-key-file PATH or ${API_KEY_ENV}", file=sys.stderr)
        key = a.api_key
    elif a.api_key_file is not None:
        try:
            with open(a.api_key_file) as f:
                key = f.read().strip()
        except OSError as e:
            raise ValueError(f"--api-key-file: cannot read {a.api_key_file}: {e.strerror}") from None
        if not key:
            raise ValueError(f"--api-key-file: {a.api_key_file} is empty")
    else:
        key = os.environ.get(API_KEY_ENV) or None
    return key


def flag_of(name: str) -> str:
    """The command-line flag of a PagingConfig field."""
    return PagingConfig.flag_of(name)


@functools.cache
def _kind(cls: type, name: str) -> tuple[type, bool]:
    """(the type, whether None is allowed) of a field, from its annotation."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0], len(args) < len(typing.get_args(hint))
