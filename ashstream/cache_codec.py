"""A small tagged binary codec for what the cache stores: analysis partials and running
states. Never pickle: a planted cache file must not run code, so decoding builds only
the types listed here, each checked against the bytes left.

Every value is a one-byte tag followed by its payload; containers hold their length
first. The types: ``None``, ``bool``, ``int`` (any size), ``float`` (its 8 IEEE bytes,
so NaN payloads, infinities and -0.0 survive), ``str``, ``bytes``, ``Decimal``,
``Fraction``, ``date``, ``datetime`` and ``time`` (with a fixed-offset or IANA zone),
``timedelta``, ``tuple``, ``list``, ``set``, ``frozenset``, ``dict``, numpy scalars and
arrays of numeric, bool, datetime and timedelta dtypes (and object arrays of the
above), Arrow data types (as a one-field IPC schema) and arrays (as a one-column IPC
stream, validated in full when read), and the few classes of ashstream's
own states registered in :data:`SAFE_CLASSES`. Anything else raises
:class:`CodecError`, and the unit holding it is simply not cached.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import fractions
import functools
import struct
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa

__all__ = ["CodecError", "dumps", "loads"]

MAX_DEPTH = 200  # nesting a decoded value may have: a planted file cannot blow the stack
# numpy kinds stored as their raw bytes: bool, signed, unsigned, float, complex,
# timedelta, datetime. Object arrays hold encoded values; anything else is refused.
RAW_KINDS = frozenset("biufcmM")

_I64 = struct.Struct("<q")
_U32 = struct.Struct("<I")
_F64 = struct.Struct("<d")


class CodecError(ValueError):
    """A value the codec cannot write, or bytes that are not a value it wrote."""


@functools.cache
def safe_classes() -> dict[str, type]:
    """ashstream's own state classes a cache entry may hold, by name: plain data,
    rebuilt from their fields (imported late: the analysis modules import a lot)."""
    from ashstream.analysis import charts, frequent
    from ashstream.analysis.aggregate import BatchPartial, ClosedGroup, Runs

    classes = [BatchPartial, Runs, ClosedGroup, charts._Series, frequent._NaN]
    return {f"{c.__module__}.{c.__qualname__}": c for c in classes}


def dumps(value: Any) -> bytes:
    """``value`` as bytes that :func:`loads` turns back into an equal value.

    Raises:
        CodecError: ``value`` holds a type the codec does not know.
    """
    out = bytearray()
    _write(out, value)
    return bytes(out)


def _write_int(out: bytearray, value: int) -> None:
    if -(2**63) <= value < 2**63:
        out += b"i" + _I64.pack(value)
        return
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    out += b"I" + _U32.pack(len(raw)) + raw


def _write_bytes(out: bytearray, tag: bytes, raw: bytes) -> None:
    out += tag + _U32.pack(len(raw)) + raw


def _write_tz(out: bytearray, tz: dt.tzinfo | None) -> None:
    if tz is None:
        out += b"N"
    elif isinstance(tz, ZoneInfo) and tz.key is not None:
        _write_bytes(out, b"z", tz.key.encode())
    elif isinstance(tz, dt.timezone):
        _write(out, tz.utcoffset(None))
    else:
        raise CodecError(f"a time zone of type {type(tz).__name__} cannot be cached")


def _write(out: bytearray, value: Any) -> None:
    writer = _WRITERS.get(type(value))
    if writer is not None:
        writer(out, value)
    elif isinstance(value, np.ndarray):
        _write_array(out, value)
    elif isinstance(value, np.generic):
        if value.dtype.kind not in RAW_KINDS:
            raise CodecError(f"a numpy {value.dtype} scalar cannot be cached")
        _write_bytes(out, b"n", value.dtype.str.encode())
        _write_bytes(out, b"b", value.tobytes())
    elif isinstance(value, pa.DataType):
        _write_bytes(out, b"A", pa.schema([pa.field("t", value)]).serialize().to_pybytes())
    elif isinstance(value, pa.Array):
        _write_bytes(out, b"W", _arrow_ipc(value))
    else:
        _write_object(out, value)


def _write_float(out: bytearray, value: float) -> None:
    out += b"f" + _F64.pack(value)


_DAY_US = 86_400_000_000


def _write_datetime(out: bytearray, value: dt.datetime) -> None:
    """Its wall clock as microseconds from 0001-01-01, its fold and its zone."""
    wall = (value.toordinal() - 1) * _DAY_US + _time_us(value)
    out += b"t" + _I64.pack(wall) + (b"\x01" if value.fold else b"\x00")
    _write_tz(out, value.tzinfo)


def _time_us(value: dt.datetime | dt.time) -> int:
    return ((value.hour * 60 + value.minute) * 60 + value.second) * 10**6 + value.microsecond


def _write_time(out: bytearray, value: dt.time) -> None:
    out += b"h" + _I64.pack(_time_us(value)) + (b"\x01" if value.fold else b"\x00")
    _write_tz(out, value.tzinfo)


def _write_timedelta(out: bytearray, value: dt.timedelta) -> None:
    out += b"e"
    for part in (value.days, value.seconds, value.microseconds):
        _write_int(out, part)


def _write_fraction(out: bytearray, value: fractions.Fraction) -> None:
    out += b"Q"
    _write_int(out, value.numerator)
    _write_int(out, value.denominator)


# Plain numbers in bulk: a container of only ints (within int64) or only floats is
# written as one array, read back with numpy: top's and count_distinct's states are
# thousands of them a batch, ~10x faster so than one tag each.
_PACKED = {int: (b"i", np.int64), float: (b"f", np.float64)}
PACK_FROM = 8  # items from which a container is worth packing


def _packed(values: Any) -> tuple[bytes, bytes] | None:
    """``values``'s kind code and bytes, when they are all ints (int64) or all floats."""
    kinds = {type(v) for v in values}
    if len(kinds) != 1:
        return None
    packing = _PACKED.get(kinds.pop())
    if packing is None:
        return None
    try:
        raw = np.fromiter(values, packing[1], len(values)).tobytes()
    except OverflowError:
        return None
    return packing[0], raw


def _collection(tag: bytes) -> Any:
    def write(out: bytearray, value: Any) -> None:
        if len(value) >= PACK_FROM:
            packed = _packed(value)
            if packed is not None:
                out += b"P" + tag + packed[0] + _U32.pack(len(value)) + packed[1]
                return
        out += tag + _U32.pack(len(value))
        for item in value:
            writer = _WRITERS.get(type(item))
            if writer is not None:
                writer(out, item)
            else:
                _write(out, item)

    return write


def _write_dict(out: bytearray, value: dict) -> None:
    if len(value) >= PACK_FROM:
        keys, items = _packed(value.keys()), _packed(value.values())
        if keys is not None and items is not None:
            out += b"M" + keys[0] + items[0] + _U32.pack(len(value)) + keys[1] + items[1]
            return
    out += b":" + _U32.pack(len(value))
    for key, item in value.items():
        _write(out, key)
        _write(out, item)


_WRITERS: dict[type, Any] = {
    type(None): lambda out, value: out.extend(b"N"),
    bool: lambda out, value: out.extend(b"T" if value else b"F"),
    int: _write_int,
    float: _write_float,
    str: lambda out, value: _write_bytes(out, b"s", value.encode("utf-8", "surrogatepass")),
    bytes: lambda out, value: _write_bytes(out, b"b", value),
    decimal.Decimal: lambda out, value: _write_bytes(out, b"D", str(value).encode()),
    fractions.Fraction: _write_fraction,
    dt.datetime: _write_datetime,
    dt.date: lambda out, value: out.extend(b"d" + _I64.pack(value.toordinal())),
    dt.time: _write_time,
    dt.timedelta: _write_timedelta,
    tuple: _collection(b"("),
    list: _collection(b"["),
    set: _collection(b"{"),
    frozenset: _collection(b"}"),
    dict: _write_dict,
}


def _write_array(out: bytearray, value: np.ndarray) -> None:
    kind = value.dtype.kind
    if kind not in RAW_KINDS and kind != "O":
        raise CodecError(f"a numpy array of {value.dtype} cannot be cached")
    _write_bytes(out, b"a", value.dtype.str.encode())
    out += _U32.pack(value.ndim)
    for size in value.shape:
        out += _I64.pack(size)
    if kind == "O":
        for item in value.reshape(-1):
            _write(out, item)
    else:
        _write_bytes(out, b"b", np.ascontiguousarray(value).tobytes())


def _arrow_ipc(array: pa.Array) -> bytes:
    """An Arrow array as an IPC stream of one column: its buffers as they are."""
    try:
        sink = pa.BufferOutputStream()
        batch = pa.record_batch([array], names=["v"])
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)
        return sink.getvalue().to_pybytes()
    except pa.ArrowException as exc:
        raise CodecError(f"an Arrow array of {array.type} cannot be cached: {exc}") from None


def _read_arrow(raw: bytes) -> pa.Array:
    """The array :func:`_arrow_ipc` wrote, its buffers checked (offsets, lengths, UTF-8)
    before any use."""
    try:
        table = pa.ipc.open_stream(pa.py_buffer(raw)).read_all()
        if table.num_columns != 1 or table.column(0).num_chunks > 1:
            raise CodecError("an Arrow array is a stream of one column and one batch")
        column = table.column(0)
        array = column.chunk(0) if column.num_chunks else pa.array([], column.type)
        array.validate(full=True)
        return array
    except (pa.ArrowException, ValueError) as exc:
        if isinstance(exc, CodecError):
            raise
        raise CodecError(f"not an Arrow array: {exc}") from None


def _write_object(out: bytearray, value: Any) -> None:
    layout = _object_layout(type(value))
    if layout is None:
        name = f"{type(value).__module__}.{type(value).__qualname__}"
        raise CodecError(f"a value of type {name} cannot be cached")
    head, names = layout
    out += head + _U32.pack(len(names))  # the fields' values, in the class's order
    for name in names:
        _write(out, getattr(value, name))


@functools.cache
def _object_layout(cls: type) -> tuple[bytes, tuple[str, ...]] | None:
    """A safe class's tag and name, and its fields' names; None for another class."""
    name = f"{cls.__module__}.{cls.__qualname__}"
    if safe_classes().get(name) is not cls:
        return None
    names = tuple(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else ()
    head = bytearray()
    _write_bytes(head, b"R", name.encode())
    return bytes(head), names


def loads(data: bytes | memoryview) -> Any:
    """The value :func:`dumps` wrote.

    Raises:
        CodecError: the bytes are not one whole value of this codec.
    """
    reader = _Reader(bytes(data))
    try:
        value = reader.value(0)
    except CodecError:
        raise
    except (struct.error, ValueError, TypeError, OverflowError, KeyError, pa.ArrowException):
        raise CodecError("the bytes are not a value of the cache's codec") from None
    if reader.at != len(reader.data):
        raise CodecError("the bytes hold more than one value")
    return value


_CODES = {code: np.dtype(dtype).newbyteorder("<") for code, dtype in _PACKED.values()}
_CONTAINERS = {b"(": tuple, b"[": list, b"{": set, b"}": frozenset}


def _clock(micros: int) -> dt.time:
    seconds, micro = divmod(micros, 10**6)
    minutes, second = divmod(seconds, 60)
    return dt.time(*divmod(minutes, 60), second, micro)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.at + n > len(self.data):
            raise CodecError("the bytes end inside a value")
        piece = self.data[self.at : self.at + n]
        self.at += n
        return piece

    def u32(self) -> int:
        return _U32.unpack(self.take(4))[0]

    def i64(self) -> int:
        return _I64.unpack(self.take(8))[0]

    def fold(self) -> int:
        fold = self.take(1)
        if fold not in (b"\x00", b"\x01"):
            raise CodecError("a fold is 0 or 1")
        return fold[0]

    def sized(self) -> bytes:
        return self.take(self.u32())

    def tagged_bytes(self) -> bytes:
        if self.take(1) != b"b":
            raise CodecError("expected bytes")
        return self.sized()

    def int(self, depth: int) -> int:
        value = self.value(depth)
        if type(value) is not int:
            raise CodecError("expected an integer")
        return value

    def tz(self, depth: int) -> dt.tzinfo | None:
        tag = self.take(1)
        if tag == b"N":
            return None
        if tag == b"z":
            try:
                return ZoneInfo(self.sized().decode())
            except (KeyError, OSError) as exc:
                raise CodecError(f"unknown time zone: {exc}") from None
        if tag == b"e":
            self.at -= 1
            return dt.timezone(self.value(depth))
        raise CodecError("expected a time zone")

    def value(self, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise CodecError("the value is nested too deeply")
        depth += 1
        tag = self.take(1)
        if tag == b"N":
            return None
        if tag in (b"T", b"F"):
            return tag == b"T"
        if tag == b"i":
            return self.i64()
        if tag == b"I":
            return int.from_bytes(self.sized(), "little", signed=True)
        if tag == b"f":
            return _F64.unpack(self.take(8))[0]
        if tag == b"s":
            return self.sized().decode("utf-8", "surrogatepass")
        if tag == b"b":
            return self.sized()
        if tag == b"D":
            try:
                return decimal.Decimal(self.sized().decode())
            except decimal.InvalidOperation:
                raise CodecError("not a decimal") from None
        if tag == b"Q":
            return fractions.Fraction(self.int(depth), self.int(depth))
        if tag == b"t":
            days, micros = divmod(self.i64(), _DAY_US)
            fold = self.fold()
            wall = dt.datetime.combine(dt.date.fromordinal(days + 1), _clock(micros))
            return wall.replace(fold=fold, tzinfo=self.tz(depth))
        if tag == b"d":
            return dt.date.fromordinal(self.i64())
        if tag == b"h":
            micros = self.i64()
            if not 0 <= micros < _DAY_US:
                raise CodecError("a time of day out of range")
            return _clock(micros).replace(fold=self.fold(), tzinfo=self.tz(depth))
        if tag == b"e":
            days, seconds, micros = (self.int(depth) for _ in range(3))
            return dt.timedelta(days, seconds, micros)
        if tag in (b"(", b"[", b"{", b"}"):
            items = [self.value(depth) for _ in range(self.u32())]
            return {b"(": tuple, b"[": list, b"{": set, b"}": frozenset}[tag](items)
        if tag == b":":
            count = self.u32()
            out = {}
            for _ in range(count):
                key = self.value(depth)
                out[key] = self.value(depth)
            return out
        if tag == b"P":
            kind = self.take(1)
            if kind not in _CONTAINERS:
                raise CodecError("a packed container of an unknown kind")
            code = self.take(1)
            return _CONTAINERS[kind](self.numbers(code, self.u32()))
        if tag == b"M":
            key_code, item_code = self.take(1), bytes(self.take(1))
            count = self.u32()
            keys = self.numbers(key_code, count)
            return dict(zip(keys, self.numbers(item_code, count), strict=True))
        if tag == b"a":
            return self.array(depth)
        if tag == b"n":
            dtype = self.dtype()
            raw = self.tagged_bytes()
            if len(raw) != dtype.itemsize or dtype.kind == "O":
                raise CodecError("a numpy scalar of the wrong size")
            return np.frombuffer(raw, dtype=dtype)[0]
        if tag == b"A":
            schema = pa.ipc.read_schema(pa.py_buffer(self.sized()))
            if len(schema) != 1:
                raise CodecError("an Arrow type is a schema of one field")
            return schema.field(0).type
        if tag == b"W":
            return _read_arrow(self.sized())
        if tag == b"R":
            return self.object(depth)
        raise CodecError(f"unknown tag {tag!r}")

    def numbers(self, code: bytes, count: int) -> list:
        dtype = _CODES.get(code)
        if dtype is None:
            raise CodecError("packed numbers of an unknown kind")
        return np.frombuffer(self.take(8 * count), dtype=dtype).tolist()

    def dtype(self) -> np.dtype:
        dtype = np.dtype(self.sized().decode())
        if (dtype.kind not in RAW_KINDS and dtype.kind != "O") or dtype.fields is not None:
            raise CodecError(f"a numpy dtype the cache does not hold: {dtype}")
        return dtype

    def array(self, depth: int) -> np.ndarray:
        dtype = self.dtype()
        shape = tuple(self.i64() for _ in range(self.u32()))
        if any(size < 0 for size in shape) or len(shape) > 32:
            raise CodecError("a numpy array of a bad shape")
        count = int(np.prod(shape, dtype=object))
        if dtype.kind == "O":
            if count > len(self.data) - self.at:  # every item takes a byte at least
                raise CodecError("the bytes end inside an array")
            flat = np.empty(count, dtype=object)
            for i in range(count):
                flat[i] = self.value(depth)
            return flat.reshape(shape)
        raw = self.tagged_bytes()
        if len(raw) != count * dtype.itemsize:
            raise CodecError("a numpy array whose bytes do not match its shape")
        return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()

    def object(self, depth: int) -> Any:
        name = self.sized().decode()
        cls = safe_classes().get(name)
        if cls is None:
            raise CodecError(f"a class the cache does not hold: {name}")
        names = _object_layout(cls)[1]
        if self.u32() != len(names):
            raise CodecError(f"{name} has {len(names)} fields")
        values = [self.value(depth) for _ in names]
        return cls(**dict(zip(names, values, strict=True)))
