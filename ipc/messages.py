"""Every message on moed's sockets, declared once.

A message is a dataclass registered under a 1-byte type code; adding one is a decorator line:

    @message(0x07)
    @dataclass(slots=True)
    class Ping:
        seq: int

On the wire (see codec.py) a message is two frames: the type byte, then a msgpack array of its
fields in declaration order. The annotations are the schema: the decoder checks every field.
Field types: int, float, bool, str, bytes, None, X | None, list[X], tuple[X, ...],
tuple[X, Y, ...] and dict[K, V].

Code ranges: 0x01-0x1f worker <-> supervisor; 0x20-0x5f daemon <-> client (later).
"""
from __future__ import annotations

from dataclasses import dataclass, is_dataclass
from typing import Callable, TypeVar

PROTOCOL_VERSION = 1

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
    direct: bool = False  # reserved: O_DIRECT / F_NOCACHE reads (not implemented yet)


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
