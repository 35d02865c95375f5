"""A per-value reference for the vectorised encoder, and the values Typst must give back.

``to_model`` turns each Arrow element into a plain Python "model" value, computing dates
and times from the raw epoch integers with its own calendar arithmetic (not pyarrow's
kernels, not Python's datetime, whose years stop at 1..9999). ``reference_literal`` writes
the literal of a model value one value at a time, and ``assert_same`` compares a model
value with what the Typst normaliser in ``typst_roundtrip`` returned.
"""

from __future__ import annotations

import decimal
import math
import struct
import zoneinfo
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ashstream.encode import (
    EncodeOptions,
    decimal_fits,
    encode_value,
    format_float,
)

UNITS_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


@dataclass(frozen=True)
class DateTime:
    """Fields of a Typst datetime; ``None`` where the literal leaves them out."""

    year: int | None
    month: int | None
    day: int | None
    hour: int | None = None
    minute: int | None = None
    second: int | None = None


@dataclass(frozen=True)
class Duration:
    seconds: int  # floored
    nanoseconds: int  # 0 <= nanoseconds < 10**9


@dataclass(frozen=True)
class Float32:
    value: float


@dataclass(frozen=True)
class Pairs:
    """A map with non-string keys: an array of (key:, value:) dictionaries."""

    items: tuple[tuple[object, object], ...]


@dataclass(frozen=True)
class Interval:
    months: int
    days: int
    nanoseconds: int


def civil_from_days(days: int) -> tuple[int, int, int]:
    """Proleptic Gregorian (year, month, day) of an epoch day (H. Hinnant's algorithm)."""
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return (y + 1 if m <= 2 else y), m, d


def _in_years(dt: DateTime) -> DateTime | None:
    return dt if -9999 <= dt.year <= 9999 else None


def _timestamp_model(seconds: int) -> DateTime | None:
    days, rest = divmod(seconds, 86_400)
    y, m, d = civil_from_days(days)
    return _in_years(DateTime(y, m, d, rest // 3600, rest % 3600 // 60, rest % 60))


def _utc_offset_s(zone: str, utc_seconds: int) -> int:
    """Offset of ``zone`` at an instant, from the tz database through Python's zoneinfo.

    zoneinfo cannot represent years outside 1..9999; those instants use the offset of the
    nearest representable year (the tz rules are constant that far out).
    """
    import datetime as dt

    clamped = min(max(utc_seconds, -62135596800 + 86400), 253402300799 - 86400)
    instant = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=clamped)
    return int(instant.astimezone(zoneinfo.ZoneInfo(zone)).utcoffset().total_seconds())


def to_model(arr: pa.Array, options: EncodeOptions) -> list[object]:
    """One model value per element of ``arr`` (any supported type)."""
    t = arr.type
    if pa.types.is_dictionary(t):
        return to_model(arr.dictionary_decode(), options)
    if pa.types.is_run_end_encoded(t):
        import pyarrow.compute as pc

        return to_model(pc.run_end_decode(arr), options)
    children = None
    if pa.types.is_struct(t):
        names = [t.field(j).name for j in range(t.num_fields)]
        children = [to_model(child, options) for child in arr.flatten()]
    out: list[object] = []
    for i in range(len(arr)):
        scalar = arr[i]
        if not scalar.is_valid:
            out.append(None)
            continue
        if pa.types.is_float32(t) or pa.types.is_float16(t):
            out.append(Float32(float(np.float32(scalar.as_py()))))
        elif pa.types.is_date32(t):
            out.append(_in_years(DateTime(*civil_from_days(scalar.value))))
        elif pa.types.is_date64(t):
            out.append(_in_years(DateTime(*civil_from_days(scalar.value // 86_400_000))))
        elif pa.types.is_timestamp(t):
            seconds = scalar.value // UNITS_PER_SECOND[t.unit]
            if t.tz is not None:
                seconds += _utc_offset_s(options.timezone, seconds)
            out.append(_timestamp_model(seconds))
        elif pa.types.is_time(t):
            seconds = scalar.value // UNITS_PER_SECOND[t.unit]
            out.append(
                DateTime(None, None, None, seconds // 3600, seconds % 3600 // 60, seconds % 60)
                if 0 <= seconds < 86_400
                else None
            )
        elif pa.types.is_duration(t):
            per = UNITS_PER_SECOND[t.unit]
            seconds, rest = divmod(scalar.value, per)
            out.append(Duration(seconds, rest * (1_000_000_000 // per)))
        elif pa.types.is_interval(t):
            v = scalar.as_py()
            out.append(Interval(v.months, v.days, v.nanoseconds))
        elif pa.types.is_map(t):
            keys, values = (to_model(c, options) for c in scalar.values.flatten())
            key_type = t.key_type.value_type if pa.types.is_dictionary(t.key_type) else t.key_type
            if pa.types.is_string(key_type) or pa.types.is_large_string(key_type):
                out.append(dict(zip(keys, values, strict=True)))
            else:
                out.append(Pairs(tuple(zip(keys, values, strict=True))))
        elif (
            pa.types.is_list(t)
            or pa.types.is_large_list(t)
            or pa.types.is_fixed_size_list(t)
            or pa.types.is_list_view(t)
            or pa.types.is_large_list_view(t)
        ):
            out.append(to_model(scalar.values, options))
        elif pa.types.is_struct(t):
            out.append({name: child[i] for name, child in zip(names, children, strict=True)})
        elif pa.types.is_decimal(t):
            out.append(scalar.as_py())
        else:
            out.append(scalar.as_py())
    return out


def reference_literal(value: object, options: EncodeOptions) -> str:
    """The literal of one model value, written value by value."""
    if isinstance(value, DateTime):
        if value.year is None:
            return f"datetime(hour: {value.hour}, minute: {value.minute}, second: {value.second})"
        date = f"datetime(year: {value.year}, month: {value.month}, day: {value.day}"
        if value.hour is None:
            return date + ")"
        return date + f", hour: {value.hour}, minute: {value.minute}, second: {value.second})"
    if isinstance(value, Duration):
        text = f"duration(seconds: {encode_value(value.seconds)})"
        if value.nanoseconds:
            text = f"({text} + duration(seconds: 1) / 1000000000 * {value.nanoseconds})"
        return text
    if isinstance(value, Float32):
        return format_float(value.value, single=True)
    if isinstance(value, Interval):
        return (
            f"(months: {value.months}, days: {value.days}, "
            f"nanoseconds: {encode_value(value.nanoseconds)})"
        )
    if isinstance(value, Pairs):
        items = [
            f"(key: {reference_literal(k, options)}, value: {reference_literal(v, options)})"
            for k, v in value.items
        ]
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
    if isinstance(value, list):
        items = [reference_literal(v, options) for v in value]
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
    if isinstance(value, dict):
        if not value:
            return "(:)"
        return (
            "("
            + ", ".join(
                f"{encode_value(k)}: {reference_literal(v, options)}" for k, v in value.items()
            )
            + ")"
        )
    return encode_value(value, options=options)


# --------------------------------------------------------------- comparing with Typst


def _typst_float(text: str) -> float:
    special = {"float.nan": math.nan, "float.inf": math.inf, "-float.inf": -math.inf}
    return special[text] if text in special else float(text.replace("\u2212", "-"))


def _same_float(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return struct.pack("<d", a) == struct.pack("<d", b)


def _decimal_of(typst_repr: str) -> decimal.Decimal:
    assert typst_repr.startswith('decimal("') and typst_repr.endswith('")'), typst_repr
    return decimal.Decimal(typst_repr[len('decimal("') : -2])


def assert_same(got: object, want: object, options: EncodeOptions, where: str = "") -> None:
    """``got`` is the normaliser's JSON for one value, ``want`` its model value."""
    msg = f"at {where or 'top'}: Typst gave {got!r}, expected {want!r}"
    if want is None:
        assert got == ["none"], msg
    elif isinstance(want, bool):
        assert got == ["bool", want], msg
    elif isinstance(want, int):
        if -(2**63) <= want < 2**63:
            assert got == ["int", str(want)], msg
        else:
            assert got[0] == "decimal" and _decimal_of(got[1]) == want, msg
    elif isinstance(want, Float32):
        assert got[0] == "float", msg
        assert _same_float(float(np.float32(_typst_float(got[1]))), want.value), msg
    elif isinstance(want, float):
        assert got[0] == "float" and _same_float(_typst_float(got[1]), want), msg
    elif isinstance(want, decimal.Decimal):
        text = format(want, "f")
        if decimal_fits(text):
            assert got[0] == "decimal" and _decimal_of(got[1]) == want, msg
        elif options.decimal_overflow == "float":
            assert got[0] == "float" and _same_float(_typst_float(got[1]), float(want)), msg
        else:
            assert got == ["str", text], msg
    elif isinstance(want, str):
        assert got == ["str", want], msg
    elif isinstance(want, bytes):
        assert got == ["bytes", list(want)], msg
    elif isinstance(want, DateTime):
        assert got == [
            "datetime",
            want.year,
            want.month,
            want.day,
            want.hour,
            want.minute,
            want.second,
        ], msg
    elif isinstance(want, Duration):
        assert got[0] == "duration", msg
        assert math.isclose(
            _typst_float(got[1]), want.seconds + want.nanoseconds / 1e9, rel_tol=1e-15, abs_tol=1e-9
        ), msg
    elif isinstance(want, Interval):
        assert got == [
            "dict",
            [
                ["months", ["int", str(want.months)]],
                ["days", ["int", str(want.days)]],
                ["nanoseconds", ["int", str(want.nanoseconds)]],
            ],
        ], msg
    elif isinstance(want, Pairs):
        assert got[0] == "array" and len(got[1]) == len(want.items), msg
        for j, (pair, (k, v)) in enumerate(zip(got[1], want.items, strict=True)):
            assert pair[0] == "dict" and [p[0] for p in pair[1]] == ["key", "value"], msg
            assert_same(pair[1][0][1], k, options, f"{where}[{j}].key")
            assert_same(pair[1][1][1], v, options, f"{where}[{j}].value")
    elif isinstance(want, list):
        assert got[0] == "array" and len(got[1]) == len(want), msg
        for j, (g, w) in enumerate(zip(got[1], want, strict=True)):
            assert_same(g, w, options, f"{where}[{j}]")
    elif isinstance(want, dict):
        assert got[0] == "dict" and [k for k, _ in got[1]] == list(want), msg
        for (k, g), w in zip(got[1], want.values(), strict=True):
            assert_same(g, w, options, f"{where}.{k}")
    else:
        raise AssertionError(f"no comparison for {type(want).__name__}: {msg}")
