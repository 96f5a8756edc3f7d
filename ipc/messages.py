"""Every message on moed's sockets, declared once.

A message is a dataclass registered under a 1-byte type code; adding one is a decorator line:

    @message(0x07)
    @dataclass(slots=True)
    class Ping:
        seq: int

On the wire (see codec.py) a message is two frames: the type byte, then a msgpack array of its
fields in declaration order. The annotations are the schema: the decoder checks every field.
Field types: int, float, bool, str, bytes, None, X | None, list[X], tuple[X, ...],
tuple[X, Y, ...], dict[K, V] and a dataclass (a nested struct: a msgpack map of its fields).

Code ranges: 0x01-0x1f worker <-> supervisor; 0x20-0x5f daemon <-> client; 0x60-0x6f between
ranks of a model split across processes or hosts (carried by mx.distributed, see daemon/ranks.py).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Callable, TypeVar

# Bump PROTOCOL_VERSION whenever a message changes, and set SCHEMA to the new schema_fingerprint()
# (tests/ipc/test_ipc.py fails until both are done): a client then refuses a daemon of another
# version at connect (ProtocolMismatch) instead of waiting for answers it cannot read.
PROTOCOL_VERSION = 3
SCHEMA = "f2265062e114aa53"

T = TypeVar("T")

REGISTRY: dict[int, type] = {}  # type code -> message class


def message(code: int) -> Callable[[type[T]], type[T]]:
    """Class decorator: register a dataclass as the message with 1-byte type `code`."""

    def register(cls: type[T]) -> type[T]:
        if not is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass (put @message above @dataclass)")
        if not 0 < code < 256:
            raise ValueError(f"type code {code:#x} for {cls.__name__} is not one byte")
        if code in REGISTRY:
            raise ValueError(f"type code {code:#04x} is taken by {REGISTRY[code].__name__}")
        cls.CODE = code  # type: ignore[attr-defined]
        REGISTRY[code] = cls
        return cls

    return register


# --- worker <-> supervisor ----------------------------------------------------------------------
# A worker's DEALER sends Ready once connected; the supervisor answers with Configure, then sends at
# most one Read at a time per worker, each answered by one ReadDone. Workers send Heartbeat when
# they have sent nothing for a heartbeat interval (also between chunks of a long read).


@message(0x01)
@dataclass(slots=True)
class Ready:
    worker_id: int
    pid: int
    version: int = PROTOCOL_VERSION


@message(0x02)
@dataclass(slots=True)
class Configure:
    files: list[str]  # file_idx in Read items indexes this list
    shm_name: str  # staging segment the worker reads into
    shm_size: int
    direct: bool = False  # bypass the page cache: O_DIRECT (Linux) / F_NOCACHE (macOS)
    queue_depth: int = 4  # reads a worker keeps in flight
    pins: list[list[int]] = field(default_factory=list)  # per file, its identity at load (workers/reader.py)


@message(0x03)
@dataclass(slots=True)
class Read:
    req_id: int
    items: list[tuple[int, int, int, int]]  # (file_idx, file_offset, length, shm_offset)


@message(0x04)
@dataclass(slots=True)
class ReadDone:
    req_id: int
    nbytes: int
    error: str | None = None  # names the file and offset on failure


@message(0x05)
@dataclass(slots=True)
class Heartbeat:
    pass


@message(0x06)
@dataclass(slots=True)
class Shutdown:
    pass


# --- client <-> daemon --------------------------------------------------------------------------
# A client's DEALER sends Hello (with the token from the connection file) before anything else; the
# daemon answers Welcome or Error("unauthorized"). Generate streams Token messages, then exactly one
# Finished or Error for that req_id. Every request is answered, never dropped: a failed one gets an
# Error naming why (rejected, bad_request, unauthorized, shutdown, internal).


@message(0x20)
@dataclass(slots=True)
class Hello:
    token: str
    client: str  # a name for `moed ps`, e.g. "moed run" or "openai-http"
    pid: int
    version: int = PROTOCOL_VERSION


@message(0x21)
@dataclass(slots=True)
class Welcome:
    model: str
    daemon_pid: int
    version: int = PROTOCOL_VERSION


@message(0x22)
@dataclass(slots=True)
class Generate:
    req_id: str
    prompt: str | None = None  # raw text, tokenized as mlx-lm's stream_generate does
    # chat: OpenAI-style message dicts ("content" a string or None, assistant "tool_calls", "tool"
    # messages); the model's chat template renders them with `tools` and `chat_template_kwargs`
    messages: list[dict[str, Any]] | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 0.0
    seed: int | None = None  # this request's own random key: the same tokens alone or in a batch
    stop: list[str] | None = None
    top_k: int = 0
    min_p: float = 0.0
    logit_bias: list[tuple[int, float]] | None = None  # (token id, bias added to its logit)
    repetition_penalty: float | None = None  # mlx-lm's logits processors
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: int = -1  # -1: none; 0: each token's logprob; N > 0: also the top N
    grammar: dict[str, Any] | None = None  # constrained decoding (daemon/engine/grammar.py)
    tools: list[dict[str, Any]] | None = None  # OpenAI-style function tools, for the chat template
    chat_template_kwargs: dict[str, Any] | None = None  # e.g. {"enable_thinking": False}
    cache_prompt: bool = True  # reuse and keep this prompt's prefix in the prompt cache
    keep_alive_s: float | None = None  # release the model after this long idle (None: the daemon's)


@message(0x23)
@dataclass(slots=True)
class Token:
    req_id: str
    text: str  # the next decoded segment (may be empty)
    token: int
    index: int  # position in the completion, from 0
    logprob: float | None = None  # when the request asked for logprobs
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), best first


@message(0x24)
@dataclass(slots=True)
class Finished:
    req_id: str
    reason: str  # "stop", "length", "abort" or "shutdown"
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    decode_tps: float
    cached_tokens: int = 0  # prompt tokens taken from the prompt cache, not prefilled
    stop_sequence: str | None = None  # the stop string that ended it (reason "stop"), else None


@message(0x25)
@dataclass(slots=True)
class Abort:
    req_id: str


@message(0x26)
@dataclass(slots=True)
class StatusQuery:
    req_id: str | None = None  # echoed in the Status, so concurrent queries each get their answer


@message(0x27)
@dataclass(slots=True)
class Status:
    snapshot: DaemonStatus
    req_id: str | None = None  # the StatusQuery's


@message(0x28)
@dataclass(slots=True)
class Error:
    req_id: str | None
    code: str  # rejected | bad_request | unauthorized | shutdown | internal | protocol | rate_limited
    message: str


@message(0x29)
@dataclass(slots=True)
class Ping:
    seq: int


@message(0x2A)
@dataclass(slots=True)
class Pong:
    seq: int


@message(0x2B)
@dataclass(slots=True)
class StopDaemon:
    pass


# --- the status snapshot -----------------------------------------------------------------------
# Status.snapshot is a DaemonStatus. The daemon's engine loop builds one at a fixed interval (and on
# state changes) and the frontend's I/O thread serves the latest as it is; `moed ps`, `moed top`,
# /metrics and /health read it. Nested structs travel as msgpack maps of their fields, decoded
# strictly: every field present, no other, each of its type. `moed ps --json` prints
# dataclasses.asdict of one; codec.from_plain(DaemonStatus, data) reads that back.


@dataclass(slots=True)
class LoadProgress:
    phase: str  # e.g. "mapping experts"; "ready" once loaded
    done: float  # 0..1


@dataclass(slots=True)
class RequestStatus:
    id: str  # "<client identity hex>:<the client's req_id>"
    client: str  # "<name>:<pid>" from the client's Hello
    prompt_tokens: int
    tokens: int  # generated so far
    max_tokens: int
    state: str  # "prefill" | "decoding"
    tps: float  # this request's decode tok/s
    age_s: float  # since it arrived


@dataclass(slots=True)
class Totals:
    """Counters over the daemon's life."""

    requests: int = 0  # admitted
    completed: int = 0  # ended by a stop or the length limit
    rejected: int = 0
    aborted: int = 0
    failed: int = 0  # ended by an error in a step
    prompt_tokens: int = 0
    completion_tokens: int = 0  # of finished requests
    generated_tokens: int = 0
    peak_active: int = 0


@dataclass(slots=True)
class PromptCacheStatus:
    """Reusable prompt prefixes (daemon/engine/prompt_cache.py): in memory, and on disk when kept there."""

    entries: int
    bytes: int
    max_bytes: int
    lookups: int  # requests that looked for a prefix
    hits: int  # ... and found one
    hit_tokens: int  # prompt tokens reused, not prefilled
    looked_up_tokens: int  # prompt tokens of those requests
    disk_dir: str | None
    disk_entries: int
    disk_bytes: int
    disk_hits: int
    disk_refused: int  # files ignored and removed: corrupt or unreadable


@dataclass(slots=True)
class EngineStatus:
    """The engine core's part (EngineCore.snapshot()); a DaemonStatus holds these fields too."""

    requests: list[RequestStatus]
    decode_tps: float
    prefill_tps: float
    kv_cache_bytes: int
    totals: Totals
    max_queue: int
    context: int | None  # tokens a request may span; None until loaded
    prompt_cache: PromptCacheStatus | None  # None: off, or not loaded


@dataclass(slots=True)
class CheckpointStatus:
    """What is loaded."""

    arch: str  # model_type
    quantization: int | None  # bits; None: not quantized
    layers: int  # decoder layers of the model
    top_k: int  # experts per token
    non_expert_bytes: int  # resident (this rank's layers when split)
    expert_bytes: int  # every expert, on disk
    layer_range: tuple[int, int]  # decoder layers [first, last) this process holds


@dataclass(slots=True)
class CacheStatus:
    """The expert cache: its slots per MoE layer and what it did."""

    budget_bytes: int
    slots_per_layer: list[int]
    experts_per_layer: list[int]
    used_slots: list[int]  # per MoE layer
    hits: int
    misses: int
    hit_rate: float
    bytes_read: int  # expert bytes paged in
    read_seconds: float  # time the engine waited for them
    prefetched: int  # experts read ahead by lookahead
    prefetch_used: int  # of those, the ones the layer's routing then chose
    layer_hits: list[int]
    layer_misses: list[int]


@dataclass(slots=True)
class WorkerStatus:
    pid: int
    alive: bool
    ready: bool  # connected (its Ready arrived)
    queued_bytes: int  # bytes of its outstanding reads
    restarts: int  # times its slot was respawned


@dataclass(slots=True)
class IoStatus:
    """The I/O workers' reads and the read mode."""

    read_calls: int
    reads: int  # byte ranges
    bytes_read: int
    read_seconds: float  # wall time inside reads
    respawns: int  # workers replaced over the daemon's life
    in_flight: int  # workers with a read outstanding
    packed: bool  # experts read from moed-pack/ (else the checkpoint's stacked tensors)
    direct: bool  # O_DIRECT / F_NOCACHE (else through the page cache)
    lookahead: bool  # the next MoE layer's experts read ahead


@dataclass(slots=True)
class HeatStatus:
    """Per MoE layer: each expert's recent use, and which experts are resident."""

    values: list[list[float]]
    resident: list[list[int]]


@dataclass(slots=True)
class MemoryStatus:
    """The daemon's RSS split into resident weights, expert cache, KV cache and the rest."""

    rss: int
    resident_weights: int
    expert_cache: int
    kv_cache: int
    other: int


@dataclass(slots=True)
class DaemonStatus(EngineStatus):
    """The daemon, whole: the engine core's fields (EngineStatus: requests, rates, counters), then
    the daemon's own. While it loads there are no requests and the counters are 0; `checkpoint`,
    `cache`, `io`, `heat` and `memory` are None until it is loaded."""

    state: str  # "starting" | "loading" | "ready" | "degraded" (why: progress.phase) | "stopping"
    progress: LoadProgress
    pid: int
    uptime_s: float
    model: str  # as given to --model
    rss_bytes: int
    http: str | None  # "HOST:PORT" of the HTTP API
    clients: int  # connected
    checkpoint: CheckpointStatus | None
    cache: CacheStatus | None
    workers: list[WorkerStatus]
    io: IoStatus | None
    heat: HeatStatus | None
    memory: MemoryStatus | None
    ranks: list[RankStatus]  # a model split across ranks: one each, rank 0 first; else empty

    @property
    def loaded(self) -> bool:
        return self.state in ("ready", "degraded") and self.cache is not None


# --- between ranks ------------------------------------------------------------------------------
# With a model split across ranks (`--ranks N` / `--hosts FILE`) every rank runs the same engine
# core in lockstep: before each step rank 0 broadcasts a RankPlan with what its clients asked for
# since the last one; when the plan asks, every rank then contributes its RankStatus.


@message(0x60)
@dataclass(slots=True)
class RankPlan:
    ops: list[Any]  # in order: ["add", [Generate fields], client] or ["abort", core req id, reason]
    step: bool = False  # then step the model once
    gather: bool = False  # then every rank sends its RankStatus
    stop: bool = False  # then exit


@message(0x61)
@dataclass(slots=True)
class RankStatus:
    rank: int
    host: str
    pid: int
    layers: tuple[int, int]  # decoder layers [first, last) this rank holds
    rss_bytes: int
    peak_rss_bytes: int
    non_expert_bytes: int
    cache_bytes: int
    hits: int
    misses: int
    bytes_read: int
    workers: int


def schema_fingerprint() -> str:
    """A digest of every message's type code and of every dataclass here (messages and the status
    snapshot's parts): names, field names and types."""
    codes = {cls: code for code, cls in REGISTRY.items()}
    rows = sorted(f"{codes.get(cls, '-')}:{name}:" + ",".join(f"{f.name}={f.type}" for f in fields(cls))
                  for name, cls in globals().items()
                  if isinstance(cls, type) and is_dataclass(cls) and cls.__module__ == __name__)
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]
