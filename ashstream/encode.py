r"""Arrow arrays and record batches, and Python values, as Typst literals.

Every literal form here was checked with the Typst compiler (0.15.1) by a round trip
through ``typst.query``; ``tests/test_encode_roundtrip.py`` keeps checking it. The hot
path (:func:`encode_array`, :func:`encode_rows`) is column-at-a-time ``pyarrow.compute``
with no per-row Python; :func:`encode_value` applies the same rules to Python objects and
agrees with the vectorised path byte for byte.

Forms (see README.rst, "Typst values"):

=============================  ==========================================================
Arrow                          Typst
=============================  ==========================================================
null, null slot                ``none``
bool                           ``true`` / ``false``
int8..int64, uint8..uint64     ``-12``; int64 min as ``(-9223372036854775807 - 1)``;
                               uint64 above int64 max as ``decimal("…")``
float16/32/64                  shortest round-trip digits, always with ``.`` or ``e``:
                               ``1.0``, ``-0.0``, ``1e+16``; ``float.nan``, ``float.inf``
decimal32..256                 ``decimal("-12.50")``; see :class:`EncodeOptions` for values
                               beyond Typst's decimal (mantissa < 2**96, scale <= 28)
string (all layouts)           ``"…"`` with ``\\ \" \n \r \t`` and ``\u{1b}`` escapes
binary (all layouts)           ``bytes((1, 255))``, ``bytes((7,))``, ``bytes(())``
date32/64                      ``datetime(year: 2024, month: 2, day: 9)``
timestamp (any unit, tz)       ``datetime(year:, month:, day:, hour:, minute:, second:)``,
                               seconds floored, tz-aware values shown in the display zone
time32/64                      ``datetime(hour:, minute:, second:)``, seconds floored
duration                       ``duration(seconds: 5)``; sub-seconds as
                               ``(duration(seconds: S) + duration(seconds: 1) / 1000000000 * NS)``
month_day_nano_interval        ``(months: 1, days: 2, nanoseconds: 3)``
list (all layouts)             ``()``, ``(x,)``, ``(a, b)``
struct, map with string keys   ``("a": 1, "b": none)``, ``(:)`` when empty
map with other keys            ``((key: 1, value: "one"),)``
dictionary, run-end encoded    decoded, then as the value type
=============================  ==========================================================

Dates and times outside Typst's years -9999..9999 (or a time of day past 23:59:59) become
``none`` and are counted in :class:`EncodeStats`.
"""

from __future__ import annotations

import collections
import datetime as dt
import decimal
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ashstream.errors import EncodeError, UnsupportedTypeError

__all__ = ["EncodeOptions", "EncodeStats", "encode_array", "encode_rows", "encode_value"]

I64_MIN = -(2**63)
I64_MAX = 2**63 - 1
# A bare -9223372036854775808 is unary minus on a literal that overflows i64, which Typst
# silently turns into a float.
I64_MIN_LITERAL = "(-9223372036854775807 - 1)"
# Typst's decimal is rust_decimal: a 96-bit mantissa and at most 28 fractional digits.
DECIMAL_MAX_MANTISSA = 2**96 - 1
DECIMAL_MAX_MANTISSA_TEXT = str(DECIMAL_MAX_MANTISSA)
DECIMAL_MAX_SCALE = 28
# Typst's datetime covers the proleptic Gregorian years -9999..9999, in epoch days:
MIN_EPOCH_DAY = -4_371_587  # -9999-01-01
MAX_EPOCH_DAY = 2_932_896  # 9999-12-31
SECONDS_PER_DAY = 86_400
UNITS_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
# C0 controls and DEL other than \t \n \r, which get \u{..} escapes so that emitted files
# stay friendly to line-based tools (Typst itself would accept them raw).
_OTHER_CONTROLS = [c for c in range(0x20) if c not in (9, 10, 13)] + [0x7F]
_ESCAPES = (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t"))
# Strings are encoded once per distinct value when a sample of this many rows has at most
# a quarter distinct values; the sample costs ~0.1 ms, a wrong guess about one extra hash.
CARDINALITY_SAMPLE_ROWS = 1024
# A batch of times of day this long builds the table of every second's text (see
# _time_of_day); shorter ones, a small report's or a first chunk's, need not pay for it.
TIME_TABLE_MIN_ROWS = 8192
_TIME_OF_DAY_TABLES: dict[str, pa.StringArray] = {}  # by opening text; a race builds twice
_DECIMAL_TYPES = {32: pa.decimal32, 64: pa.decimal64, 128: pa.decimal128, 256: pa.decimal256}

DecimalOverflow = Literal["float", "string", "error"]


@functools.cache
def _byte_text() -> pa.StringArray:
    """ "0".."255", built on first use: building an array at import would make pyarrow
    import pandas (see ashstream.startup) before the command line could say not to."""
    return pa.array([str(b) for b in range(256)], pa.string())


@dataclass(frozen=True)
class EncodeOptions:
    """How to encode values that have more than one reasonable Typst form.

    Attributes:
        timezone: IANA zone in which tz-aware timestamps are shown; Typst datetimes carry
            no zone, so they hold the wall-clock fields of this zone. Naive timestamps are
            shown as they are.
        decimal_overflow: what to emit for a decimal Typst cannot hold exactly (more than
            28 fractional digits or a mantissa of 2**96 or more, e.g. DuckDB HUGEINT):
            ``"float"`` (default) ``float("…")``, the nearest float; ``"string"`` the exact
            digits as a string; ``"error"`` raise :class:`EncodeError`. The first two are
            counted in :class:`EncodeStats`.
    """

    timezone: str = "UTC"
    decimal_overflow: DecimalOverflow = "float"

    def __post_init__(self) -> None:
        try:
            ZoneInfo(self.timezone)
        except (ValueError, KeyError) as exc:  # ZoneInfoNotFoundError is a KeyError
            raise EncodeError(
                f"unknown time zone {self.timezone!r}: use an IANA name such as 'UTC' "
                "or 'Europe/Berlin'"
            ) from exc
        if self.decimal_overflow not in ("float", "string", "error"):
            raise EncodeError(
                f"decimal_overflow must be 'float', 'string' or 'error', "
                f"not {self.decimal_overflow!r}"
            )


@dataclass
class EncodeStats:
    """Values the encoder could not represent exactly, counted by (column, reason)."""

    counts: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)

    def add(self, column: str, reason: str, n: int) -> None:
        if n:
            self.counts[(column, reason)] += n

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def messages(self) -> list[str]:
        """One line per (column, reason), for logs and run summaries."""
        return [f"column {col!r}: {n} {reason}" for (col, reason), n in sorted(self.counts.items())]


OUT_OF_RANGE = "value(s) outside Typst's datetime range became none"
DECIMAL_INEXACT = "decimal(s) beyond Typst's decimal range written as float"
DECIMAL_AS_STRING = "decimal(s) beyond Typst's decimal range written as string"


# --------------------------------------------------------------------------- public API


def encode_array(
    array: pa.Array | pa.ChunkedArray,
    *,
    options: EncodeOptions | None = None,
    stats: EncodeStats | None = None,
    name: str = "value",
) -> pa.StringArray:
    """Encode each element of ``array`` as a Typst literal; nulls become ``none``.

    Args:
        array: any supported Arrow array, chunked or not, sliced or not.
        options: encoding choices; defaults to :class:`EncodeOptions()`.
        stats: if given, receives counts of values that were not represented exactly.
        name: the column name used in error messages.

    Raises:
        UnsupportedTypeError: the type has no Typst form (unions, extension types).
        EncodeError: invalid UTF-8, duplicate keys, or a decimal beyond range with
            ``decimal_overflow="error"``.
    """
    options = options or EncodeOptions()
    stats = stats if stats is not None else EncodeStats()
    if encoder_name() == "native":
        return _native_array(array, options, stats, name)
    encoder = _ArrowEncoder(options, stats)
    return pc.fill_null(encoder.encode_column(array, name), "none")


def encode_rows(
    batch: pa.RecordBatch | pa.Table,
    *,
    options: EncodeOptions | None = None,
    stats: EncodeStats | None = None,
) -> pa.StringArray:
    """Encode each row as a Typst dictionary literal keyed by the column names.

    Keys are always quoted and in column order:
    ``("id": 1, "name": "A \\"B\\"", "day": datetime(year: 2024, month: 2, day: 9))``.
    Options, stats and errors are as for :func:`encode_array`.
    """
    return _encode_rows(batch, options, stats, close=")")


def encode_rows_text(
    batch: pa.RecordBatch | pa.Table,
    *,
    options: EncodeOptions | None = None,
    stats: EncodeStats | None = None,
) -> tuple[pa.Buffer, np.ndarray]:
    """The rows as one UTF-8 buffer, each literal followed by ``,\\n`` (the body of a Typst
    array), and the offset where each row ends in it. Built in the same join as the rows,
    so no second copy is made."""
    options = options or EncodeOptions()
    stats = stats if stats is not None else EncodeStats()
    if encoder_name() == "native":
        text, ends = _native_rows(batch, options, stats, close="),\n")
        return text, ends[1:]
    return _reference_rows_text(batch, options, stats)


def encoder_name() -> str:
    """The encoder this process runs: ``"native"`` (``ashstream._encoder``, compiled at
    install) or ``"reference"`` (pyarrow.compute, this module); see
    :func:`ashstream.encode_native.chosen`."""
    global _ENCODER
    if _ENCODER is None:
        from ashstream import encode_native

        _ENCODER = encode_native.chosen()
    return _ENCODER


_ENCODER: str | None = None  # resolved on first use, once per process


def _reference_rows_text(
    batch: pa.RecordBatch | pa.Table, options: EncodeOptions, stats: EncodeStats
) -> tuple[pa.Buffer, np.ndarray]:
    rows = _encode_rows(batch, options, stats, close="),\n")
    offsets = np.frombuffer(rows.buffers()[1], np.int32, count=len(rows) + 1)
    if not len(rows) or rows.buffers()[2] is None:
        return pa.py_buffer(b""), np.zeros(0, np.int64)
    text = rows.buffers()[2].slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    return text, (offsets[1:] - offsets[0]).astype(np.int64)


def _encode_rows(
    batch: pa.RecordBatch | pa.Table,
    options: EncodeOptions | None,
    stats: EncodeStats | None,
    close: str,
) -> pa.StringArray:
    options = options or EncodeOptions()
    stats = stats if stats is not None else EncodeStats()
    if encoder_name() == "native":
        return _native_text_array(*_native_rows(batch, options, stats, close))
    encoder = _ArrowEncoder(options, stats)
    names = batch.schema.names
    _check_unique_names(names)
    columns = [encoder.encode_column(batch.column(i), n) for i, n in enumerate(names)]
    return _join_dictionary(names, columns, batch.num_rows, close)


def _check_unique_names(names: Sequence[str]) -> None:
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise EncodeError(
            f"column name {duplicate!r} appears twice; Typst dictionaries need unique keys. "
            "Give the columns distinct names (e.g. with AS in SQL)."
        )


def _native_rows(
    batch: pa.RecordBatch | pa.Table, options: EncodeOptions, stats: EncodeStats, close: str
) -> tuple[pa.Buffer, np.ndarray]:
    """Rows by the compiled join; a table's batches one by one (their text joined)."""
    from ashstream import encode_native

    names = batch.schema.names
    _check_unique_names(names)
    if not names:  # "(:" + close per row, as the reference writes it
        return _no_column_rows(batch.num_rows, close)
    prefixes = _key_prefixes(tuple(names))
    if isinstance(batch, pa.RecordBatch):
        return encode_native.rows(batch, options, stats, prefixes, close)
    parts = [
        encode_native.rows(part, options, stats, prefixes, close) for part in batch.to_batches()
    ]
    if not parts:
        return pa.py_buffer(b""), np.zeros(1, np.int64)
    if len(parts) == 1:
        return parts[0]
    starts = np.cumsum([0, *(int(ends[-1]) for _, ends in parts[:-1])])
    ends = np.concatenate(
        [[0], *(ends[1:] + start for (_, ends), start in zip(parts, starts, strict=True))]
    )
    text = pa.py_buffer(b"".join(memoryview(text) for text, _ in parts))
    return text, ends.astype(np.int64)


def _no_column_rows(count: int, close: str) -> tuple[pa.Buffer, np.ndarray]:
    row = ("(:" + close).encode()
    return pa.py_buffer(row * count), np.arange(count + 1, dtype=np.int64) * len(row)


def _native_text_array(text: pa.Buffer, ends: np.ndarray) -> pa.Array:
    from ashstream import encode_native

    return encode_native.text_array(text, ends)


def _native_array(
    array: pa.Array | pa.ChunkedArray, options: EncodeOptions, stats: EncodeStats, name: str
) -> pa.StringArray:
    from ashstream import encode_native

    chunks = array.chunks if isinstance(array, pa.ChunkedArray) else [array]
    pieces = []
    for chunk in chunks:
        text, ends = encode_native.rows(
            pa.record_batch([chunk], names=[name]), options, stats, [""], ""
        )
        pieces.append(encode_native.text_array(text, ends).cast(pa.string()))
    if not pieces:
        return pa.array([], pa.string())
    return pieces[0] if len(pieces) == 1 else pa.concat_arrays(pieces)


def encode_value(obj: object, *, options: EncodeOptions | None = None) -> str:
    """Encode a Python value (scalars, lists, tuples, dicts; Arrow scalars) as a literal.

    The rules are those of :func:`encode_array`: ``encode_value(1.0) == "1.0"``,
    ``encode_value([1]) == "(1,)"``, ``encode_value({"a": None}) == '("a": none)'``.
    """
    return _PythonEncoder(options or EncodeOptions()).encode(obj)


def typst_type(arrow_type: pa.DataType) -> str:
    """The Typst type a column of ``arrow_type`` becomes, for people reading a schema."""
    t = arrow_type
    if pa.types.is_dictionary(t) or pa.types.is_run_end_encoded(t):
        return typst_type(t.value_type)
    checks = [
        (pa.types.is_null, "none"),
        (pa.types.is_boolean, "bool"),
        (lambda x: x == pa.uint64(), "int (decimal above 2^63-1)"),
        (pa.types.is_integer, "int"),
        (pa.types.is_floating, "float"),
        (pa.types.is_decimal, "decimal"),
        (
            lambda x: (
                pa.types.is_string(x) or pa.types.is_large_string(x) or pa.types.is_string_view(x)
            ),
            "str",
        ),
        (
            lambda x: (
                pa.types.is_binary(x)
                or pa.types.is_large_binary(x)
                or pa.types.is_fixed_size_binary(x)
                or pa.types.is_binary_view(x)
            ),
            "bytes",
        ),
        (pa.types.is_date, "datetime (date)"),
        (pa.types.is_timestamp, "datetime"),
        (pa.types.is_time, "datetime (time of day)"),
        (pa.types.is_duration, "duration"),
        (pa.types.is_interval, "dictionary (months, days, nanoseconds)"),
        (pa.types.is_struct, "dictionary"),
        (pa.types.is_map, "dictionary or array of (key, value)"),
    ]
    for check, name in checks:
        if check(t):
            return name
    if hasattr(t, "value_type"):
        return f"array of {typst_type(t.value_type)}"
    return "unsupported: cast it in SQL"


# --------------------------------------------------------------------- Python values


def quote_string(text: str) -> str:
    """A Typst string literal for ``text``; the reference for the vectorised escaping."""
    out = text.replace("\\", "\\\\").replace('"', '\\"')
    out = out.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    for code in _OTHER_CONTROLS:
        out = out.replace(chr(code), f"\\u{{{code:x}}}")
    return f'"{out}"'


def format_int(value: int) -> str:
    if I64_MIN < value <= I64_MAX:
        return str(value)
    if value == I64_MIN:
        return I64_MIN_LITERAL
    return f'decimal("{value}")'  # beyond i64; exact while below 2**96 (checked by callers)


def format_float(value: float, *, single: bool = False) -> str:
    """Arrow's float text (shortest round-trip digits) with ``.0`` added to integral values.

    Arrow writes plain digits for decimal exponents -7 < e < 10 and ``d.ddde+NN`` otherwise;
    matching it keeps this function and the vectorised path byte-identical.
    ``single`` formats the shortest digits of the float32 value.
    """
    if math.isnan(value):
        return "float.nan"
    if math.isinf(value):
        return "float.inf" if value > 0 else "-float.inf"
    sign = "-" if math.copysign(1.0, value) < 0 else ""
    text = str(np.float32(abs(value))) if single else repr(abs(value))
    mantissa, _, exp_text = text.partition("e")
    int_part, _, frac_part = mantissa.partition(".")
    digits = (int_part + frac_part).lstrip("0")
    exponent = int(exp_text or 0) + len(int_part) - 1 - (len(int_part + frac_part) - len(digits))
    digits = digits.rstrip("0")
    if not digits:
        return f"{sign}0.0"
    if -7 < exponent < 10:
        if exponent >= 0:
            whole = digits[: exponent + 1].ljust(exponent + 1, "0")
            frac = digits[exponent + 1 :] or "0"
        else:
            whole, frac = "0", "0" * (-exponent - 1) + digits
        return f"{sign}{whole}.{frac}"
    frac = f".{digits[1:]}" if len(digits) > 1 else ""
    return f"{sign}{digits[0]}{frac}e{'+' if exponent > 0 else '-'}{abs(exponent)}"


def format_decimal(value: decimal.Decimal, overflow: DecimalOverflow, column: str = "value") -> str:
    if not value.is_finite():
        return format_float(float(value))
    text = format(value, "f")
    if decimal_fits(text):
        return f'decimal("{text}")'
    return _decimal_fallback(text, overflow, column)


def decimal_fits(text: str) -> bool:
    """Whether Typst's decimal holds the plain decimal ``text`` exactly."""
    int_part, _, frac_part = text.lstrip("-").partition(".")
    mantissa = (int_part + frac_part).lstrip("0")
    return len(frac_part) <= DECIMAL_MAX_SCALE and (
        len(mantissa) < len(DECIMAL_MAX_MANTISSA_TEXT)
        or (
            len(mantissa) == len(DECIMAL_MAX_MANTISSA_TEXT)
            and mantissa <= DECIMAL_MAX_MANTISSA_TEXT
        )
    )


def _decimal_fallback(text: str, overflow: DecimalOverflow, column: str) -> str:
    if overflow == "error":
        raise EncodeError(
            f"column {column!r}: decimal {text} is beyond Typst's decimal range (a mantissa "
            f"below 2**96 and at most {DECIMAL_MAX_SCALE} fractional digits). Round or cast it "
            "in SQL, or set decimal_overflow to 'float' or 'string'."
        )
    return f'float("{text}")' if overflow == "float" else f'"{text}"'


def datetime_literal(year: int, month: int, day: int) -> str:
    return f"datetime(year: {year}, month: {month}, day: {day})"


def timestamp_literal(year: int, month: int, day: int, hour: int, minute: int, second: int) -> str:
    return (
        f"datetime(year: {year}, month: {month}, day: {day}, "
        f"hour: {hour}, minute: {minute}, second: {second})"
    )


def time_literal(hour: int, minute: int, second: int) -> str:
    return f"datetime(hour: {hour}, minute: {minute}, second: {second})"


def duration_literal(seconds: int, nanoseconds: int) -> str:
    """``seconds`` floored, ``0 <= nanoseconds < 10**9``: Typst durations take whole units."""
    base = f"duration(seconds: {format_int(seconds)})"
    if not nanoseconds:
        return base
    return f"({base} + duration(seconds: 1) / 1000000000 * {nanoseconds})"


def interval_literal(months: int, days: int, nanoseconds: int) -> str:
    return f"(months: {months}, days: {days}, nanoseconds: {format_int(nanoseconds)})"


def sequence_literal(items: Sequence[str]) -> str:
    if len(items) == 1:
        return f"({items[0]},)"
    return f"({', '.join(items)})"


def dictionary_literal(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return "(:)"
    return "(" + ", ".join(f"{quote_string(k)}: {v}" for k, v in pairs) + ")"


class _PythonEncoder:
    def __init__(self, options: EncodeOptions) -> None:
        self.options = options
        self.zone = ZoneInfo(options.timezone)

    def encode(self, obj: object) -> str:
        if obj is None:
            return "none"
        if isinstance(obj, pa.Scalar):
            return encode_array(pa.array([obj], obj.type), options=self.options)[0].as_py()
        if isinstance(obj, bool | np.bool_):
            return "true" if obj else "false"
        if isinstance(obj, int | np.integer):
            value = int(obj)
            if abs(value) > DECIMAL_MAX_MANTISSA:
                return _decimal_fallback(str(value), self.options.decimal_overflow, "value")
            return format_int(value)
        if isinstance(obj, np.float32 | np.float16):
            return format_float(float(obj), single=True)
        if isinstance(obj, float | np.floating):
            return format_float(float(obj))
        if isinstance(obj, decimal.Decimal):
            return format_decimal(obj, self.options.decimal_overflow)
        if isinstance(obj, str):
            return quote_string(obj)
        if isinstance(obj, bytes | bytearray | memoryview):
            return "bytes(" + sequence_literal([str(b) for b in bytes(obj)]) + ")"
        if isinstance(obj, dt.datetime):
            if obj.tzinfo is not None:
                obj = obj.astimezone(self.zone)
            return timestamp_literal(obj.year, obj.month, obj.day, obj.hour, obj.minute, obj.second)
        if isinstance(obj, dt.date):
            return datetime_literal(obj.year, obj.month, obj.day)
        if isinstance(obj, dt.time):
            return time_literal(obj.hour, obj.minute, obj.second)
        if isinstance(obj, dt.timedelta):
            seconds, micros = divmod(obj // dt.timedelta(microseconds=1), 1_000_000)
            return duration_literal(seconds, micros * 1000)
        if isinstance(obj, pa.MonthDayNano):
            return interval_literal(obj.months, obj.days, obj.nanoseconds)
        if isinstance(obj, Mapping):
            if all(isinstance(k, str) for k in obj):
                return dictionary_literal([(k, self.encode(v)) for k, v in obj.items()])
            return sequence_literal(
                [f"(key: {self.encode(k)}, value: {self.encode(v)})" for k, v in obj.items()]
            )
        if isinstance(obj, list | tuple):
            return sequence_literal([self.encode(v) for v in obj])
        raise EncodeError(
            f"cannot encode a Python {type(obj).__name__} as a Typst value: use None, bool, "
            "int, float, Decimal, str, bytes, date, datetime, time, timedelta, list or dict"
        )


# ----------------------------------------------------------------------- Arrow arrays


def _join_dictionary(
    keys: Sequence[str], values: Sequence[pa.Array], length: int, close: str = ")"
) -> pa.Array:
    """``("k1": v1, "k2": v2`` + ``close`` per row; null values become ``none``."""
    if not keys:
        return pa.array(["(:" + close] * length, pa.string())
    parts: list[object] = []
    for prefix, value in zip(_key_prefixes(tuple(keys)), values, strict=True):
        parts += [prefix, value]
    parts.append(close)
    return pc.binary_join_element_wise(*parts, "", null_handling="replace", null_replacement="none")


@functools.lru_cache(maxsize=256)
def _key_prefixes(keys: tuple[str, ...]) -> list[str]:
    """``("k1": ``, ``, "k2": ``, …: every batch of a stream has the same columns."""
    return [("(" if i == 0 else ", ") + quote_string(key) + ": " for i, key in enumerate(keys)]


def _join_items(
    item_text: pa.Array,
    lengths: pa.Array,
    *,
    open_: str = "(",
    close: str = ")",
    single_close: str = ",)",
    empty: str | None = None,
) -> pa.Array:
    """Join consecutive runs of ``item_text`` (run i has ``lengths[i]`` items)."""
    lengths_np = lengths.to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(lengths_np) + 1, np.int64)
    np.cumsum(lengths_np, out=offsets[1:])
    if offsets[-1] < 2**31:
        runs = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), item_text)
    else:
        runs = pa.LargeListArray.from_arrays(pa.array(offsets), item_text)
    joined = pc.binary_join(runs, ", ")
    closing = pc.if_else(pc.equal(lengths, 1), single_close, close)
    text = pc.binary_join_element_wise(open_, joined, closing, "")
    if empty is not None and empty != open_ + close:
        text = pc.if_else(pc.equal(lengths, 0), empty, text)
    return text


def _keep_valid(text: pa.Array, source: pa.Array) -> pa.Array:
    if source.null_count == 0:
        return text
    return pc.if_else(source.is_valid(), text, pa.scalar(None, pa.string()))


def _describe(path: str, type_: pa.DataType) -> str:
    return f"column {path!r} of type {type_}"


def _by_value(values: pa.Array, encode: Callable[[pa.Array], pa.Array]) -> pa.Array:
    """``encode`` each distinct value once, then gather: dates, times of day and many
    string columns repeat a lot, and hashing is cheaper than formatting."""
    encoded = pc.dictionary_encode(values)
    return encode(encoded.dictionary).take(encoded.indices)


def _day_text(days: pa.Array, close: str) -> pa.Array:
    """``datetime(year: Y, month: M, day: D`` + ``close`` for epoch days (int32/int64)."""
    dates = days.cast(pa.int32()).view(pa.date32())
    year, month, day = (f(dates).cast(pa.string()) for f in (pc.year, pc.month, pc.day))
    return pc.binary_join_element_wise(
        "datetime(year: ", year, ", month: ", month, ", day: ", day, close, ""
    )


def _time_of_day(seconds: pa.Array, open_: str) -> pa.Array:
    """``_time_of_day_text`` of seconds since midnight (0 to 86,399). A day has only
    86,400 of them: once a batch is big enough to pay for it (~10 ms), each text is
    made once per process and gathered from the table, 15 ns a row against 130-160."""
    table = _TIME_OF_DAY_TABLES.get(open_)
    if table is None and len(seconds) >= TIME_TABLE_MIN_ROWS:
        every_second = pa.array(np.arange(SECONDS_PER_DAY, dtype=np.int64))
        table = _TIME_OF_DAY_TABLES[open_] = _time_of_day_text(every_second, open_)
    if table is None:
        return _by_value(seconds, lambda s: _time_of_day_text(s, open_))
    return table.take(seconds)


def _time_of_day_text(seconds: pa.Array, open_: str) -> pa.Array:
    """``open_`` + ``H, minute: M, second: S)`` for seconds since midnight."""
    hours = pc.divide(seconds, 3600)
    minutes = pc.divide(pc.subtract(seconds, pc.multiply(hours, 3600)), 60)
    secs = pc.subtract(seconds, pc.multiply(pc.divide(seconds, 60), 60))
    h, m, s = (x.cast(pa.string()) for x in (hours, minutes, secs))
    return pc.binary_join_element_wise(open_, h, ", minute: ", m, ", second: ", s, ")", "")


def _bytes_present(text: pa.Array, needle: bytes) -> bool:
    """Whether ``needle`` (one byte) occurs in the data of a string array; a vectorised
    memchr that is many times cheaper than a per-row search."""
    return bool((_string_data(text) == needle[0]).any())


def _string_data(arr: pa.Array) -> np.ndarray:
    """The bytes of a (sliced) string array's values, without copying."""
    if not len(arr):
        return np.zeros(0, np.uint8)
    bufs = arr.buffers()
    end = arr.offset + len(arr) + 1
    offsets = np.frombuffer(bufs[1], np.int32, count=end)[arr.offset :]
    if bufs[2] is None:
        return np.zeros(0, np.uint8)
    return np.frombuffer(bufs[2], np.uint8, count=int(offsets[-1]))[offsets[0] :]


def _quote_strings(arr: pa.Array) -> pa.Array:
    data = _string_data(arr)
    for raw, escaped in _ESCAPES:
        if (data == ord(raw)).any():
            arr = pc.replace_substring(arr, raw, escaped)
    controls = (data < 0x20) | (data == 0x7F)
    if controls.any():
        # bincount, not np.unique: unique imports numpy.ma (~8 ms of a small report)
        present = np.flatnonzero(np.bincount(data[controls]))
        for code in present:
            if code not in (9, 10, 13):
                arr = pc.replace_substring(arr, chr(code), f"\\u{{{code:x}}}")
    return pc.binary_join_element_wise('"', arr, '"', "")


class _ArrowEncoder:
    """Encodes one array at a time; results are string arrays with nulls kept."""

    def __init__(self, options: EncodeOptions, stats: EncodeStats | None) -> None:
        self.options = options
        self.stats = stats if stats is not None else EncodeStats()

    def encode_column(self, array: pa.Array | pa.ChunkedArray, path: str) -> pa.Array:
        if isinstance(array, pa.ChunkedArray):
            pieces = [self.encode(chunk, path) for chunk in array.chunks]
            if not pieces:
                return pa.array([], pa.string())
            return pa.concat_arrays([p.cast(pa.string()) for p in pieces])
        return self.encode(array, path).cast(pa.string())

    def encode(self, arr: pa.Array, path: str) -> pa.Array:
        t = arr.type
        if pa.types.is_null(t):
            return pa.nulls(len(arr), pa.string())
        if pa.types.is_boolean(t):
            return pc.if_else(arr, "true", "false")
        if pa.types.is_integer(t):
            return self._integers(arr)
        if pa.types.is_floating(t):
            return self._floats(arr)
        if pa.types.is_decimal(t):
            return self._decimals(arr, path)
        if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
            return self._strings(arr, path)
        if (
            pa.types.is_binary(t)
            or pa.types.is_large_binary(t)
            or pa.types.is_fixed_size_binary(t)
            or pa.types.is_binary_view(t)
        ):
            return self._binaries(arr)
        if pa.types.is_date(t):
            return self._dates(arr, path)
        if pa.types.is_timestamp(t):
            return self._timestamps(arr, path)
        if pa.types.is_time(t):
            return self._times(arr, path)
        if pa.types.is_duration(t):
            return self._durations(arr)
        if pa.types.is_interval(t):
            return self._intervals(arr)
        if pa.types.is_map(t):  # before lists: a map is a list of structs
            return self._maps(arr, path)
        if (
            pa.types.is_list(t)
            or pa.types.is_large_list(t)
            or pa.types.is_fixed_size_list(t)
            or pa.types.is_list_view(t)
            or pa.types.is_large_list_view(t)
        ):
            return self._lists(arr, path)
        if pa.types.is_struct(t):
            return self._structs(arr, path)
        if pa.types.is_dictionary(t):
            return pc.take(self.encode(arr.dictionary, path), arr.indices)
        if pa.types.is_run_end_encoded(t):
            return self.encode(pc.run_end_decode(arr), path)
        raise UnsupportedTypeError(
            f"{_describe(path, t)} has no Typst form. Cast it in SQL to a supported type, "
            f"e.g. CAST({path.split('.')[0]} AS VARCHAR)."
        )

    # ---- scalars

    def _integers(self, arr: pa.Array) -> pa.Array:
        text = arr.cast(pa.string())
        if arr.null_count == len(arr):
            return text
        t = arr.type
        if t == pa.int64():
            if pc.min(arr).as_py() == I64_MIN:
                text = pc.if_else(pc.equal(arr, I64_MIN), I64_MIN_LITERAL, text)
        elif t == pa.uint64() and pc.max(arr).as_py() > I64_MAX:
            wrapped = pc.binary_join_element_wise('decimal("', text, '")', "")
            text = pc.if_else(pc.greater(arr, pa.scalar(I64_MAX, pa.uint64())), wrapped, text)
        return text

    def _floats(self, arr: pa.Array) -> pa.Array:
        if pa.types.is_float16(arr.type):
            arr = arr.cast(pa.float32())  # exact; Arrow writes float32 digits shortest-first
        text = arr.cast(pa.string())
        # Arrow writes 1.0 as "1" and -0.0 as "-0", which Typst would read as integers.
        if pa.types.is_float64(arr.type):
            # Arrow's text is plain digits exactly for integral values below 1e10.
            looks_int = pc.and_(pc.equal(arr, pc.floor(arr)), pc.less(pc.abs(arr), 1e10))
        else:  # the shortest float32 digits of values just below 1e10 can be "1e+10"
            looks_int = pc.match_substring_regex(text, r"^-?[0-9]+$")
        looks_int = pc.fill_null(looks_int, False)
        if pc.any(looks_int).as_py():
            with_point = pc.binary_join_element_wise(text.filter(looks_int), ".0", "")
            text = pc.replace_with_mask(text, looks_int, with_point)
        finite = pc.is_finite(arr)
        if not pc.all(finite).as_py():
            special = pc.if_else(
                pc.is_nan(arr),
                "float.nan",
                pc.if_else(pc.greater(arr, 0), "float.inf", "-float.inf"),
            )
            text = pc.if_else(finite, text, special)
        return text

    def _decimals(self, arr: pa.Array, path: str) -> pa.Array:
        t = arr.type
        if t.scale < 0:
            text = _unscaled_decimal_text(arr)
        else:
            text = arr.cast(pa.string())
            # Arrow switches to exponent form (1E-7, 0E-10) below 1e-6; Typst rejects it.
            if _bytes_present(text, b"E"):
                sci = pc.fill_null(pc.match_substring(text, "E"), False)
                text = pc.replace_with_mask(text, sci, _unscaled_decimal_text(arr.filter(sci)))
        exact = pc.binary_join_element_wise('decimal("', text, '")', "")
        if t.precision <= DECIMAL_MAX_SCALE and 0 <= t.scale <= DECIMAL_MAX_SCALE:
            return exact  # every value of this type fits Typst's decimal
        if t.scale > DECIMAL_MAX_SCALE:
            fits = pa.array(np.zeros(len(arr), bool))  # no value fits
        else:
            digits = pc.replace_substring(pc.replace_substring(text, "-", ""), ".", "")
            mantissa = pc.utf8_ltrim(digits, "0")
            width = pc.utf8_length(mantissa)
            limit = len(DECIMAL_MAX_MANTISSA_TEXT)
            fits = pc.or_(
                pc.less(width, limit),
                pc.and_(pc.equal(width, limit), pc.less_equal(mantissa, DECIMAL_MAX_MANTISSA_TEXT)),
            )
        n_over = len(arr) - arr.null_count - _count_true(fits)
        if not n_over:
            return exact
        policy = self.options.decimal_overflow
        if policy == "error":
            first = pc.index(pc.fill_null(fits, True), False).as_py()
            _decimal_fallback(text[first].as_py(), policy, path)
        if policy == "float":
            fallback = pc.binary_join_element_wise('float("', text, '")', "")
            self.stats.add(path, DECIMAL_INEXACT, n_over)
        else:
            fallback = pc.binary_join_element_wise('"', text, '"', "")
            self.stats.add(path, DECIMAL_AS_STRING, n_over)
        return pc.if_else(fits, exact, fallback)

    def _strings(self, arr: pa.Array, path: str) -> pa.Array:
        if not pa.types.is_string(arr.type):  # one layout for the joins below
            arr = arr.cast(pa.string())
        try:
            arr.validate(full=True)
        except pa.ArrowInvalid as exc:
            raise _invalid_utf8_error(arr, path) from exc
        if len(arr) > 2 * CARDINALITY_SAMPLE_ROWS:
            sample = arr.slice(0, CARDINALITY_SAMPLE_ROWS)
            if pc.count_distinct(sample).as_py() <= CARDINALITY_SAMPLE_ROWS // 4:
                return _by_value(arr, _quote_strings)
        return _quote_strings(arr)

    def _binaries(self, arr: pa.Array) -> pa.Array:
        t = arr.type
        if pa.types.is_binary_view(t):
            arr, t = arr.cast(pa.large_binary()), pa.large_binary()
        bufs = arr.buffers()
        data = np.frombuffer(bufs[-1], np.uint8) if bufs[-1] is not None else np.zeros(0, np.uint8)
        if pa.types.is_fixed_size_binary(t):
            width = t.byte_width
            start = arr.offset * width
            values = data[start : start + len(arr) * width]
            lengths = np.full(len(arr), width, np.int64)
        else:
            dtype = np.int64 if pa.types.is_large_binary(t) else np.int32
            end = arr.offset + len(arr) + 1
            offsets = np.frombuffer(bufs[1], dtype, count=end)[arr.offset :]
            values = data[offsets[0] : offsets[-1]] if len(offsets) else data[:0]
            lengths = np.diff(offsets).astype(np.int64)
        byte_text = _byte_text().take(pa.array(values, pa.uint8()))
        text = _join_items(
            byte_text, pa.array(lengths), open_="bytes((", close="))", single_close=",))"
        )
        return _keep_valid(text, arr)

    # ---- dates and times

    def _out_of_range(self, arr: pa.Array, ints: pa.Array, lo: int, hi: int, path: str) -> pa.Array:
        """``arr`` with values whose integer form lies outside ``[lo, hi]`` set to null."""
        if len(arr) == arr.null_count:
            return arr
        low, high = pc.min_max(ints).values()
        if low.as_py() >= lo and high.as_py() <= hi:
            return arr
        inside = pc.and_(pc.greater_equal(ints, lo), pc.less_equal(ints, hi))
        self.stats.add(path, OUT_OF_RANGE, len(arr) - arr.null_count - _count_true(inside))
        return pc.if_else(inside, arr, pa.scalar(None, arr.type))

    def _dates(self, arr: pa.Array, path: str) -> pa.Array:
        if pa.types.is_date32(arr.type):
            days = arr.view(pa.int32())
        else:
            days = _floor_divide(arr.view(pa.int64()), SECONDS_PER_DAY * 1000)
        days = self._out_of_range(days, days, MIN_EPOCH_DAY, MAX_EPOCH_DAY, path)
        return _by_value(days, lambda d: _day_text(d, ")"))

    def _timestamps(self, arr: pa.Array, path: str) -> pa.Array:
        unit, tz = arr.type.unit, arr.type.tz
        per_day = SECONDS_PER_DAY * UNITS_PER_SECOND[unit]
        arr = self._out_of_range(arr, arr.view(pa.int64()), *tick_range(unit), path)
        if tz is not None:  # wall-clock time in the display zone, as a naive timestamp
            arr = pc.local_timestamp(arr.cast(pa.timestamp(unit, self.options.timezone)))
        ticks = arr.view(pa.int64())
        days = _floor_divide(ticks, per_day)
        if tz is not None:  # the display zone can move a value past the year range
            days = self._out_of_range(days, days, MIN_EPOCH_DAY, MAX_EPOCH_DAY, path)
        seconds = pc.divide(pc.subtract(ticks, pc.multiply(days, per_day)), UNITS_PER_SECOND[unit])
        date_text = _by_value(days, lambda d: _day_text(d, ""))
        time_text = _time_of_day(seconds, ", hour: ")
        return pc.binary_join_element_wise(date_text, time_text, "")

    def _times(self, arr: pa.Array, path: str) -> pa.Array:
        per_second = UNITS_PER_SECOND[arr.type.unit]
        ints = arr.view(pa.int32() if pa.types.is_time32(arr.type) else pa.int64()).cast(pa.int64())
        ints = self._out_of_range(ints, ints, 0, SECONDS_PER_DAY * per_second - 1, path)
        seconds = pc.divide(ints, per_second)
        return _time_of_day(seconds, "datetime(hour: ")

    def _durations(self, arr: pa.Array) -> pa.Array:
        per_second = UNITS_PER_SECOND[arr.type.unit]
        ints = arr.view(pa.int64())
        if per_second == 1:
            return pc.binary_join_element_wise("duration(seconds: ", self._integers(ints), ")", "")
        seconds = self._integers(_floor_divide(ints, per_second))
        nanos = pc.multiply(_floor_remainder(ints, per_second), 1_000_000_000 // per_second)
        whole = pc.binary_join_element_wise("duration(seconds: ", seconds, ")", "")
        fraction = pc.binary_join_element_wise(
            "(", whole, " + duration(seconds: 1) / 1000000000 * ", nanos.cast(pa.string()), ")", ""
        )
        return pc.if_else(pc.equal(nanos, 0), whole, fraction)

    def _intervals(self, arr: pa.Array) -> pa.Array:
        if arr.type != pa.month_day_nano_interval():
            raise UnsupportedTypeError(f"{_describe('value', arr.type)} has no Typst form")
        layout = np.dtype([("months", "<i4"), ("days", "<i4"), ("nanoseconds", "<i8")])
        if not len(arr):
            return pa.array([], pa.string())
        end = arr.offset + len(arr)
        data = np.frombuffer(arr.buffers()[1], layout, count=end)[arr.offset :]
        months, days = (pa.array(data[f]).cast(pa.string()) for f in ("months", "days"))
        nanos = self._integers(pa.array(data["nanoseconds"]))
        text = pc.binary_join_element_wise(
            "(months: ", months, ", days: ", days, ", nanoseconds: ", nanos, ")", ""
        )
        return _keep_valid(text, arr)

    # ---- nested

    def _lists(self, arr: pa.Array, path: str) -> pa.Array:
        lengths = pc.fill_null(pc.list_value_length(arr), 0)
        items = pc.fill_null(self.encode(arr.flatten(), path + "[]"), "none")
        return _keep_valid(_join_items(items, lengths), arr)

    def _structs(self, arr: pa.Array, path: str) -> pa.Array:
        names = [arr.type.field(i).name for i in range(arr.type.num_fields)]
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise UnsupportedTypeError(
                    f"{_describe(path, arr.type)}: field name {name!r} appears twice, and "
                    "Typst dictionaries need unique keys. Rename the fields in SQL, e.g. "
                    "struct_pack(a := x, b := y)."
                )
            seen.add(name)
        children = [
            self.encode(c, f"{path}.{n}") for c, n in zip(arr.flatten(), names, strict=True)
        ]
        return _keep_valid(_join_dictionary(names, children, len(arr)), arr)

    def _maps(self, arr: pa.Array, path: str) -> pa.Array:
        # MapArray.keys/.items ignore slicing (and casting to list<struct> aborted the
        # process on some sliced inputs, pyarrow 26), so cut the entries out by offsets.
        offsets = arr.offsets.to_numpy()
        entries = arr.values.slice(offsets[0], offsets[-1] - offsets[0])
        keys, values = entries.flatten()
        lengths = pa.array(np.diff(offsets).astype(np.int64))
        value_text = pc.fill_null(self.encode(values, path + "[]"), "none")
        key_type = keys.type.value_type if pa.types.is_dictionary(keys.type) else keys.type
        if pa.types.is_string(key_type) or pa.types.is_large_string(key_type):
            self._check_unique_keys(keys, lengths, path)
            key_text = self.encode(keys, path + "[key]")
            pairs = pc.binary_join_element_wise(key_text, ": ", value_text, "")
            text = _join_items(pairs, lengths, single_close=")", empty="(:)")
        else:
            key_text = pc.fill_null(self.encode(keys, path + "[key]"), "none")
            pairs = pc.binary_join_element_wise(
                "(key: ", key_text, ", value: ", value_text, ")", ""
            )
            text = _join_items(pairs, lengths)
        return _keep_valid(text, arr)

    @staticmethod
    def _check_unique_keys(keys: pa.Array, lengths: pa.Array, path: str) -> None:
        if len(keys) < 2:
            return
        owner = np.repeat(np.arange(len(lengths)), lengths.to_numpy(zero_copy_only=False))
        table = pa.table({"owner": owner, "key": keys.cast(pa.large_string())})
        counts = table.group_by(["owner", "key"]).aggregate([([], "count_all")])
        repeated = counts.filter(pc.greater(counts["count_all"], 1))
        if repeated.num_rows:
            raise EncodeError(
                f"{_describe(path, pa.map_(keys.type, pa.null()))}: key "
                f"{repeated['key'][0].as_py()!r} appears twice in one map, and Typst "
                "dictionaries need unique keys. Deduplicate the map in SQL."
            )


def tick_range(unit: str) -> tuple[int, int]:
    """The int64 timestamps of ``unit`` inside Typst's years -9999..9999."""
    per_day = SECONDS_PER_DAY * UNITS_PER_SECOND[unit]
    return max(MIN_EPOCH_DAY * per_day, I64_MIN), min((MAX_EPOCH_DAY + 1) * per_day - 1, I64_MAX)


def _unscaled_decimal_text(arr: pa.Array) -> pa.Array:
    """Plain digits with the type's scale (``-12.50``, ``0.0000001``, ``12300``), built
    from the unscaled integer: the same storage viewed with scale 0."""
    t = arr.type
    unscaled = arr.view(_DECIMAL_TYPES[t.bit_width](t.precision, 0)).cast(pa.string())
    if t.scale <= 0:
        zeros = "0" * -t.scale
        return pc.if_else(
            pc.equal(unscaled, "0"), "0", pc.binary_join_element_wise(unscaled, zeros, "")
        )
    digits = pc.utf8_lpad(pc.utf8_ltrim(unscaled, "-"), width=t.scale + 1, padding="0")
    return pc.binary_join_element_wise(
        pc.if_else(pc.starts_with(unscaled, "-"), "-", ""),
        pc.utf8_slice_codeunits(digits, 0, -t.scale),
        ".",
        pc.utf8_slice_codeunits(digits, -t.scale),
        "",
    )


def _invalid_utf8_error(arr: pa.Array, path: str) -> EncodeError:
    for row, value in enumerate(arr.cast(pa.large_binary()).to_pylist()):
        if value is None:
            continue
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as exc:
            return EncodeError(
                f"invalid UTF-8 ({exc.reason} at byte {exc.start}: "
                f"{value[max(0, exc.start - 8) : exc.start + 8]!r}). Typst source must be UTF-8; "
                "fix the data or cast the column to BLOB to keep the raw bytes.",
                column=path,
                row=row,
            )
    return EncodeError("invalid string data", column=path)


def _count_true(mask: pa.Array) -> int:
    return pc.sum(mask).as_py() or 0  # the sum of no values is null


def _floor_divide(ints: pa.Array, divisor: int) -> pa.Array:
    quotient = pc.divide(ints, divisor)  # truncates toward zero
    behind = pc.and_(pc.less(ints, 0), pc.not_equal(pc.multiply(quotient, divisor), ints))
    return pc.if_else(behind, pc.subtract(quotient, 1), quotient)


def _floor_remainder(ints: pa.Array, divisor: int) -> pa.Array:
    return pc.subtract(ints, pc.multiply(_floor_divide(ints, divisor), divisor))
