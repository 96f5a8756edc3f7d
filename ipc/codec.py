"""Frames <-> messages: a 1-byte type frame, then a msgpack array of the fields. No pickle.

Decoding is strict: a wrong frame count, an unknown type, malformed, truncated or oversized msgpack,
a wrong field count or a field of the wrong type raises ProtocolError. Field checkers are compiled
once per message class from its annotations (see messages.py).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable, Sequence

import msgpack

from .messages import REGISTRY

MAX_PAYLOAD = 8 << 20  # bytes of msgpack per message; large blobs belong in shared memory

Checker = Callable[[Any], Any]  # returns the (possibly converted) value or raises ProtocolError


class ProtocolError(ValueError):
    """A message that does not follow the protocol."""


def encode(msg: Any) -> list[bytes]:
    """Message -> [type byte, msgpack payload]."""
    code = getattr(type(msg), "CODE", None)
    if code not in REGISTRY or REGISTRY[code] is not type(msg):
        raise ProtocolError(f"{type(msg).__name__} is not a registered message")
    spec = _spec(code)
    try:
        payload = msgpack.packb([getattr(msg, n) for n in spec.names], use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(f"cannot encode {type(msg).__name__}: {e}") from None
    return [spec.type_frame, payload]


def decode(frames: Sequence[bytes | memoryview], max_payload: int = MAX_PAYLOAD) -> Any:
    """[type byte, msgpack payload] -> message, or ProtocolError."""
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames, got {len(frames)}")
    head, payload = frames
    if len(head) != 1:
        raise ProtocolError(f"type frame must be 1 byte, got {len(head)}")
    if (code := head[0]) not in REGISTRY:
        raise ProtocolError(f"unknown message type {code:#04x}")
    if len(payload) > max_payload:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {max_payload}")
    spec = _spec(code)
    try:
        values = msgpack.unpackb(payload, raw=False, use_list=True, strict_map_key=True,
                                 ext_hook=_reject_ext)
    except Exception as e:  # truncated, extra data, bad utf-8, too deep, ext types...
        raise ProtocolError(f"bad msgpack in {spec.cls.__name__}: {type(e).__name__}: {e}"
                            ) from None
    if type(values) is not list or len(values) != len(spec.names):
        raise ProtocolError(f"{spec.cls.__name__} wants {len(spec.names)} fields, "
                            f"got {values!r:.80}")
    try:
        return spec.cls(*[check(v) for check, v in zip(spec.checkers, values)])
    except ProtocolError as e:
        raise ProtocolError(f"{spec.cls.__name__}: {e}") from None


# --- per-class specs ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
    cls: type
    type_frame: bytes
    names: tuple[str, ...]
    checkers: tuple[Checker, ...]


_SPECS: dict[int, _Spec] = {}


def _spec(code: int) -> _Spec:
    spec = _SPECS.get(code)
    if spec is None:  # compiled on first use, so messages registered after import work too
        cls = REGISTRY[code]
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        spec = _SPECS[code] = _Spec(cls, bytes([code]), tuple(f.name for f in fields),
                                    tuple(_checker(hints[f.name]) for f in fields))
    return spec


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack ext type {code} not allowed")


def _fail(want: str, value: Any) -> typing.NoReturn:
    raise ProtocolError(f"expected {want}, got {type(value).__name__} {value!r:.60}")


def _checker(tp: Any) -> Checker:
    """Compile a field annotation into a checker (exact types: a bool is not an int)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:  # free-form msgpack value (status snapshots)
        return lambda v: v
    if tp is type(None) or tp is None:
        return lambda v: v if v is None else _fail("None", v)
    if tp in (int, str, bool, bytes):
        return lambda v: v if type(v) is tp else _fail(tp.__name__, v)
    if tp is float:
        return lambda v: float(v) if type(v) in (float, int) else _fail("float", v)
    if origin in (typing.Union, types.UnionType):
        return _union_checker(args)
    if origin is list:
        item = _checker(args[0])
        return lambda v: [item(x) for x in v] if type(v) is list else _fail("list", v)
    if origin is tuple:
        return _tuple_checker(args)
    if origin is dict:
        key, val = _checker(args[0]), _checker(args[1])
        return lambda v: ({key(k): val(x) for k, x in v.items()} if type(v) is dict
                          else _fail("dict", v))
    raise TypeError(f"unsupported message field type {tp!r}")


def _union_checker(args: tuple) -> Checker:
    optional = type(None) in args
    rest = [a for a in args if a is not type(None)]
    inner = _checker(rest[0]) if len(rest) == 1 else _first_match([_checker(a) for a in rest])
    if optional:
        return lambda v: None if v is None else inner(v)
    return inner


def _first_match(checkers: list[Checker]) -> Checker:
    def check(v: Any) -> Any:
        for c in checkers:
            try:
                return c(v)
            except ProtocolError:
                pass
        _fail("one of the union's types", v)
    return check


def _tuple_checker(args: tuple) -> Checker:
    msgpack_seq = (list, tuple)
    if len(args) == 2 and args[1] is Ellipsis:
        item = _checker(args[0])
        return lambda v: tuple(item(x) for x in v) if type(v) in msgpack_seq else _fail("tuple", v)
    if args and all(a is int for a in args):  # fast path: the hot Read.items entries
        n = len(args)

        def ints(v: Any) -> tuple:
            if type(v) in msgpack_seq and len(v) == n and all(type(x) is int for x in v):
                return tuple(v)
            _fail(f"{n} ints", v)
        return ints
    items = [_checker(a) for a in args]

    def fixed(v: Any) -> tuple:
        if type(v) not in msgpack_seq or len(v) != len(items):
            _fail(f"tuple of {len(items)}", v)
        return tuple(c(x) for c, x in zip(items, v))
    return fixed
