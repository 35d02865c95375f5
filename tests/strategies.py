"""Hypothesis strategies for random Arrow arrays: every supported type, nested, with nulls
everywhere, sometimes sliced. Leaves are built from raw integers where Python objects
cannot hold the value (dates beyond year 9999, nanoseconds), nested arrays bottom-up."""

from __future__ import annotations

import decimal

import numpy as np
import pyarrow as pa
from hypothesis import strategies as st

I64 = st.integers(-(2**63), 2**63 - 1)
# Epoch days a little past Typst's -9999..9999 on both sides, and now and then far out.
EPOCH_DAYS = st.one_of(st.integers(-4_400_000, 2_950_000), st.integers(-(2**31), 2**31 - 1))

TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from("\\\"\n\r\t\x00\x01\x1b\x7f#$[]{}*_`<>@/ 'é😀データ\u2028\ufeff"),
        st.characters(exclude_categories=("Cs",)),
    ),
    max_size=12,
)


@st.composite
def _mask(draw, n: int) -> np.ndarray | None:
    if draw(st.booleans()):
        return None
    return np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)


def _ints(draw, n: int, elements) -> list[int]:
    return draw(st.lists(elements, min_size=n, max_size=n))


@st.composite
def leaf_arrays(draw, n: int) -> pa.Array:
    kind = draw(
        st.sampled_from(
            [
                "bool",
                "int",
                "uint64",
                "float64",
                "float32",
                "float16",
                "decimal",
                "decimal256",
                "string",
                "large_string",
                "string_view",
                "binary",
                "large_binary",
                "fixed_binary",
                "date32",
                "date64",
                "timestamp",
                "time32",
                "time64",
                "duration",
                "interval",
                "null",
                "dictionary",
            ]
        )
    )
    mask = draw(_mask(n))
    if kind == "bool":
        return pa.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), mask=mask)
    if kind == "int":
        t = draw(
            st.sampled_from(
                [
                    pa.int8(),
                    pa.int16(),
                    pa.int32(),
                    pa.int64(),
                    pa.uint8(),
                    pa.uint16(),
                    pa.uint32(),
                ]
            )
        )
        info = np.iinfo(t.to_pandas_dtype())
        values = _ints(draw, n, st.integers(int(info.min), int(info.max)))
        return pa.array(values, t, mask=mask)
    if kind == "uint64":
        return pa.array(_ints(draw, n, st.integers(0, 2**64 - 1)), pa.uint64(), mask=mask)
    if kind == "float64":
        values = draw(
            st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=n, max_size=n)
        )
        return pa.array(values, pa.float64(), mask=mask)
    if kind == "float32":
        values = draw(st.lists(st.floats(width=32), min_size=n, max_size=n))
        return pa.array(np.array(values, np.float32), pa.float32(), mask=mask)
    if kind == "float16":
        values = draw(st.lists(st.floats(width=16), min_size=n, max_size=n))
        return pa.array(np.array(values, np.float16), pa.float16(), mask=mask)
    if kind in ("decimal", "decimal256"):
        wide = kind == "decimal256"
        precision = draw(st.integers(1, 76 if wide else 38))
        scale = draw(st.integers(-3, min(precision, 40)))
        unscaled = _ints(draw, n, st.integers(-(10**precision) + 1, 10**precision - 1))
        make = pa.decimal256 if wide else pa.decimal128
        integers = pa.array([decimal.Decimal(u) for u in unscaled], make(precision, 0), mask=mask)
        return integers.view(make(precision, scale))
    if kind in ("string", "large_string", "string_view"):
        t = {
            "string": pa.string(),
            "large_string": pa.large_string(),
            "string_view": pa.string_view(),
        }[kind]
        return pa.array(draw(st.lists(TEXT, min_size=n, max_size=n)), t, mask=mask)
    if kind in ("binary", "large_binary"):
        values = draw(st.lists(st.binary(max_size=6), min_size=n, max_size=n))
        return pa.array(values, pa.binary() if kind == "binary" else pa.large_binary(), mask=mask)
    if kind == "fixed_binary":
        width = draw(st.integers(1, 4))
        values = draw(st.lists(st.binary(min_size=width, max_size=width), min_size=n, max_size=n))
        return pa.array(values, pa.binary(width), mask=mask)
    if kind == "date32":
        return pa.array(_ints(draw, n, EPOCH_DAYS), pa.int32(), mask=mask).cast(pa.date32())
    if kind == "date64":
        days = _ints(draw, n, st.integers(-4_400_000, 2_950_000))
        ms = [d * 86_400_000 + draw(st.integers(0, 86_399_999)) for d in days]
        return pa.array(ms, pa.int64(), mask=mask).cast(pa.date64())
    if kind == "timestamp":
        unit = draw(st.sampled_from(["s", "ms", "us", "ns"]))
        tz = draw(st.sampled_from([None, "UTC", "America/New_York", "Asia/Kolkata"]))
        values = _ints(draw, n, st.one_of(I64, st.integers(-(10**10), 10**10)))
        return pa.array(values, pa.int64(), mask=mask).cast(pa.timestamp(unit, tz))
    if kind in ("time32", "time64"):
        unit = draw(st.sampled_from(["s", "ms"] if kind == "time32" else ["us", "ns"]))
        per_day = 86_400 * {"s": 1, "ms": 1000, "us": 10**6, "ns": 10**9}[unit]
        values = _ints(draw, n, st.integers(0, per_day))  # per_day itself is 24:00:00
        int_type = pa.int32() if kind == "time32" else pa.int64()
        return pa.array(values, int_type, mask=mask).cast(getattr(pa, kind)(unit))
    if kind == "duration":
        unit = draw(st.sampled_from(["s", "ms", "us", "ns"]))
        return pa.array(_ints(draw, n, I64), pa.int64(), mask=mask).cast(pa.duration(unit))
    if kind == "interval":
        values = [
            pa.MonthDayNano(
                [
                    draw(st.integers(-(2**31), 2**31 - 1)),
                    draw(st.integers(-(2**31), 2**31 - 1)),
                    draw(I64),
                ]
            )
            for _ in range(n)
        ]
        return pa.array(values, pa.month_day_nano_interval(), mask=mask)
    if kind == "null":
        return pa.nulls(n)
    values = draw(st.lists(st.sampled_from(["a", "b\n", None, '"c"']), min_size=n, max_size=n))
    return pa.array(values, pa.string()).dictionary_encode()


def _offsets(draw, n: int, child_len: int) -> np.ndarray:
    cuts = sorted(
        draw(st.lists(st.integers(0, child_len), min_size=max(n - 1, 0), max_size=max(n - 1, 0)))
    )
    return np.array([0, *cuts, child_len][: n + 1] if n else [0], np.int32)


@st.composite
def arrays(draw, n: int | None = None, depth: int = 2) -> pa.Array:
    """A random array of length ``n`` (drawn when None), nested up to ``depth`` levels."""
    if n is None:
        n = draw(st.integers(0, 8))
    extra = draw(st.integers(0, 3))  # build a longer array, then slice n out of it
    start = draw(st.integers(0, extra))
    return draw(_unsliced_arrays(n + extra, depth))[start : start + n]


@st.composite
def _unsliced_arrays(draw, n: int, depth: int) -> pa.Array:
    kind = draw(
        st.sampled_from(["leaf"] * 3 + (["list", "struct", "map", "fixed_list"] if depth else []))
    )
    if kind == "leaf":
        arr = draw(leaf_arrays(n))
    elif kind == "list":
        child_len = draw(st.integers(0, 10))
        child = draw(arrays(child_len, depth - 1))
        offsets = _offsets(draw, n, child_len)
        arr = pa.ListArray.from_arrays(pa.array(offsets), child, mask=_mask_array(draw, n))
    elif kind == "fixed_list":
        size = draw(st.integers(1, 3))
        child = draw(arrays(n * size, depth - 1))
        arr = pa.FixedSizeListArray.from_arrays(child, size, mask=_mask_array(draw, n))
    elif kind == "struct":
        names = draw(
            st.lists(
                st.sampled_from(["a", "b", "if", "my key", "", '"q"', "x.y"]),
                unique=True,
                max_size=3,
            )
        )
        children = [draw(arrays(n, depth - 1)) for _ in names]
        if not names:
            arr = pa.array([{}] * n, pa.struct([]))
        else:
            arr = pa.StructArray.from_arrays(children, names, mask=_mask_array(draw, n))
    else:
        string_keys = draw(st.booleans())
        sizes = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
        keys = [f"k{j}" if string_keys else j for size in sizes for j in range(size)]
        items = draw(arrays(len(keys), depth - 1))
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
        arr = pa.MapArray.from_arrays(pa.array(offsets), pa.array(keys), items)
    return arr


def _mask_array(draw, n: int) -> pa.BooleanArray | None:
    mask = draw(_mask(n))
    return None if mask is None else pa.array(mask)


@st.composite
def tables(draw) -> pa.Table:
    n = draw(st.integers(0, 6))
    names = draw(
        st.lists(
            st.sampled_from(["id", "name", "if", "a b", "", "ü", '"k"']), unique=True, max_size=4
        )
    )
    return pa.table({name: draw(arrays(n, depth=1)) for name in names})
