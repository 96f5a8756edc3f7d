"""Frames <-> messages: a 1-byte type frame, then a msgpack array of the fields. No pickle.

Decoding is strict: a wrong frame count, an unknown type, malformed, truncated or oversized msgpack,
a wrong field count or a field of the wrong type raises ProtocolError, naming the field by its path
(`Status.snapshot.workers[1].alive: expected bool, got int 1`). A nested struct (a dataclass field,
e.g. the status snapshot's parts) travels as a map of its fields; a missing or unknown field is an
error too. Field checkers are compiled once per class from its annotations (see messages.py).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable, Sequence, TypeVar

import msgpack

from .messages import REGISTRY

MAX_PAYLOAD = 8 << 20  # bytes of msgpack per message; large blobs belong in shared memory

Checker = Callable[[Any], Any]  # returns the (possibly converted) value or raises ProtocolError
T = TypeVar("T")


class ProtocolError(ValueError):
    """A message that does not follow the protocol."""


class _FieldError(ProtocolError):
    """A bad value at `path` (dotted fields, [i] list items) inside a message."""

    def __init__(self, step: str, inner: ProtocolError):
        if isinstance(inner, _FieldError):
            self.path = step + ("" if inner.path.startswith("[") else ".") + inner.path
            self.reason = inner.reason
        else:
            self.path, self.reason = step, str(inner)
        super().__init__(f"{self.path}: {self.reason}")


def encode(msg: Any) -> list[bytes]:
    """Message -> [type byte, msgpack payload]."""
    code = getattr(type(msg), "CODE", None)
    if code not in REGISTRY or REGISTRY[code] is not type(msg):
        raise ProtocolError(f"{type(msg).__name__} is not a registered message")
    spec = _spec(code)
    try:
        payload = msgpack.packb([getattr(msg, n) for n in spec.names], use_bin_type=True, default=_fields_map)
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
        raise ProtocolError(f"{spec.cls.__name__}.{_locate(spec, values, e)}") from None


def from_plain(cls: type[T], value: Any) -> T:
    """A struct (dataclass) from plain data, checked as strictly as decode() checks a nested one:
    e.g. `from_plain(DaemonStatus, json.loads(moed ps --json))`. Raises ProtocolError."""
    try:
        return _struct_checker(cls)(value)
    except ProtocolError as e:
        raise ProtocolError(f"{cls.__name__}{'.' if isinstance(e, _FieldError) else ': '}{e}") from None


def _fields_map(obj: Any) -> dict:
    """msgpack's fallback for a nested struct: the map of its fields."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def _locate(spec: "_Spec", values: list, e: ProtocolError) -> str:
    """'field: reason' for the first field of `values` that fails its check (the slow path)."""
    for name, check, v in zip(spec.names, spec.checkers, values):
        try:
            check(v)
        except ProtocolError as inner:
            return str(_FieldError(name, inner))
    return str(e)  # pragma: no cover - the constructor itself never raises ProtocolError


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
        return _list_checker(_checker(args[0]))
    if origin is tuple:
        return _tuple_checker(args)
    if origin is dict:
        key, val = _checker(args[0]), _checker(args[1])
        return lambda v: ({key(k): val(x) for k, x in v.items()} if type(v) is dict
                          else _fail("dict", v))
    if dataclasses.is_dataclass(tp):
        return _struct_checker(tp)
    raise TypeError(f"unsupported message field type {tp!r}")


def _list_checker(item: Checker) -> Checker:
    def check(v: Any) -> list:
        if type(v) is not list:
            _fail("list", v)
        try:
            return [item(x) for x in v]
        except ProtocolError:  # the slow path: which item
            for i, x in enumerate(v):
                try:
                    item(x)
                except ProtocolError as e:
                    raise _FieldError(f"[{i}]", e) from None
            raise
    return check


_STRUCTS: dict[type, Checker] = {}


def _struct_checker(cls: type) -> Checker:
    """A nested struct: a map with exactly the dataclass's fields, each checked by its annotation."""
    if (done := _STRUCTS.get(cls)) is not None:
        return done
    hints = typing.get_type_hints(cls)
    fields = {f.name: _checker(hints[f.name]) for f in dataclasses.fields(cls)}
    want = fields.keys()

    def check(v: Any) -> Any:
        if type(v) is not dict:
            _fail(f"a map of {cls.__name__}'s fields", v)
        if v.keys() != want:
            unknown = [k for k in v if k not in fields]
            missing = [k for k in fields if k not in v]
            raise ProtocolError("; ".join(
                ([f"unknown field {', '.join(map(repr, unknown))}"[:200]] if unknown else [])
                + ([f"missing field {', '.join(map(repr, missing))}"] if missing else [])))
        out = {}
        for name, c in fields.items():
            try:
                out[name] = c(v[name])
            except ProtocolError as e:
                raise _FieldError(name, e) from None
        return cls(**out)

    _STRUCTS[cls] = check
    return check


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
