"""The compiled encoder's Python side: what each column hands to ``ashstream._encoder``.

The C join (``ashstream/_native/encoder.c``) writes the common types itself, straight
from the Arrow buffers: null, bool, integers, float64, decimals up to 128 bits, strings,
binaries, dates, timestamps, times and durations. Everything else — nested types,
float16/32, decimal256, intervals — is made into text by the reference encoder
(:mod:`ashstream.encode`) and copied by the join, as are a dictionary column's distinct
values. Work that needs pyarrow (validating UTF-8, converting zoned timestamps to the
display zone) happens here, with the reference's own helpers, so that both encoders
raise the same errors and count the same lossy values.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ashstream import encode as reference
from ashstream.errors import SettingsError

try:
    from ashstream import _encoder
except ImportError:  # built without a C compiler: the reference runs
    _encoder = None

ENCODER_VARIABLE = "ASHSTREAM_ENCODER"
_POLICIES = {"float": 0, "string": 1}  # "error": such columns go to the reference


def available() -> bool:
    return _encoder is not None


def chosen() -> str:
    """``"native"`` or ``"reference"``: $ASHSTREAM_ENCODER if set, else native when built."""
    choice = os.environ.get(ENCODER_VARIABLE, "").strip().lower()
    if choice in ("", "auto"):
        return "native" if available() else "reference"
    if choice == "reference":
        return choice
    if choice == "native":
        if not available():
            raise SettingsError(
                f"{ENCODER_VARIABLE}=native, but this installation has no compiled encoder "
                "(it was installed without a C compiler): reinstall with gcc present, or "
                f"unset {ENCODER_VARIABLE}"
            )
        return choice
    raise SettingsError(
        f"{ENCODER_VARIABLE} must be 'native', 'reference' or unset, not {choice!r}"
    )


def rows(
    batch: pa.RecordBatch,
    options: reference.EncodeOptions,
    stats: reference.EncodeStats,
    prefixes: list[str],
    close: str,
) -> tuple[pa.Buffer, np.ndarray]:
    """Each row as ``prefixes[0] value_0 prefixes[1] value_1 … close``, in one buffer, and
    the int64 offsets where rows start and end (``num_rows + 1`` of them, from 0)."""
    encoder = reference._ArrowEncoder(options, stats)
    names = batch.schema.names
    specs = []
    keep = []  # arrays made here must outlive the call
    for column, name, prefix in zip(batch.columns, names, prefixes, strict=True):
        array, raw = _prepare(encoder, column, name)
        keep.append(array)
        schema_capsule, array_capsule = array.__arrow_c_array__()
        specs.append((schema_capsule, array_capsule, raw, prefix.encode(), *_sizes(array)))
    policy = options.decimal_overflow
    text, ends, counts = _encoder.encode_rows(
        specs, close.encode(), batch.num_rows, _POLICIES.get(policy, 0)
    )
    lossy = reference.DECIMAL_INEXACT if policy == "float" else reference.DECIMAL_AS_STRING
    for name, (out_of_range, decimals_over) in zip(names, counts, strict=True):
        stats.add(name, reference.OUT_OF_RANGE, out_of_range)
        stats.add(name, lossy, decimals_over)
    return pa.py_buffer(text), np.frombuffer(ends, np.int64)


def _sizes(array: pa.Array) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The byte sizes of ``array``'s buffers and of its dictionary's, which the C join
    checks every offset and index against (the C data interface gives pointers only)."""

    def of(arr: pa.Array | None) -> tuple[int, int, int]:
        found = [] if arr is None else [0 if b is None else b.size for b in arr.buffers()]
        return (*found, 0, 0, 0)[:3]

    return of(array), of(array.dictionary if pa.types.is_dictionary(array.type) else None)


def text_array(text: pa.Buffer, ends: np.ndarray) -> pa.Array:
    """The rows of :func:`rows` as a string array (large when past 2 GiB)."""
    count = len(ends) - 1
    if ends[-1] < 2**31:
        offsets = pa.py_buffer(ends.astype(np.int32))
        return pa.StringArray.from_buffers(count, offsets, text)
    return pa.LargeStringArray.from_buffers(count, pa.py_buffer(ends), text)


def _prepare(encoder: reference._ArrowEncoder, arr: pa.Array, path: str) -> tuple[pa.Array, bool]:
    """The array the C join reads for one column, and whether it is text to copy."""
    t = arr.type
    if pa.types.is_dictionary(t):
        # The reference's order and errors: the values first (invalid UTF-8 named by
        # row), then the gather (an index out of range); the C join checks indices too.
        values = _values_text(encoder, arr.dictionary, path)
        indices = arr.indices
        if indices.null_count < len(indices):
            low, high = (m.as_py() for m in pc.min_max(indices).values())
            if low < 0 or high >= len(values):
                encoder.encode(arr, path)  # raises pyarrow's error, as the reference does
        return pa.DictionaryArray.from_arrays(indices, values), True
    if pa.types.is_string_view(t) or pa.types.is_string(t) or pa.types.is_large_string(t):
        if pa.types.is_string_view(t):
            arr = arr.cast(pa.string())
        try:
            arr.validate(full=True)
        except pa.ArrowInvalid as exc:
            raise reference._invalid_utf8_error(arr, path) from exc
        return arr, False
    if pa.types.is_binary_view(t):
        arr = arr.cast(pa.large_binary())
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        arr.validate(full=True)
        return arr, False
    if pa.types.is_timestamp(t) and t.tz is not None:
        return _local_time(encoder, arr, path), False
    if _is_native_value(t) and not _may_raise(t, encoder.options):
        arr.validate()
        return arr, False
    text = encoder.encode(arr, path)
    if not (pa.types.is_string(text.type) or pa.types.is_large_string(text.type)):
        text = text.cast(pa.string())
    return text, True


def _is_native_value(t: pa.DataType) -> bool:
    return (
        pa.types.is_null(t)
        or pa.types.is_boolean(t)
        or pa.types.is_integer(t)
        or pa.types.is_float64(t)
        or (pa.types.is_decimal(t) and t.bit_width <= 128 and t.scale >= 0)
        or pa.types.is_fixed_size_binary(t)
        or pa.types.is_date(t)
        or pa.types.is_timestamp(t)
        or pa.types.is_time(t)
        or pa.types.is_duration(t)
    )


def _may_raise(t: pa.DataType, options: reference.EncodeOptions) -> bool:
    """A decimal type with values beyond Typst's range, under decimal_overflow="error":
    the reference raises its error, and in column order."""
    return (
        pa.types.is_decimal(t)
        and options.decimal_overflow == "error"
        and not (
            t.precision <= reference.DECIMAL_MAX_SCALE and t.scale <= reference.DECIMAL_MAX_SCALE
        )
    )


def _values_text(encoder: reference._ArrowEncoder, values: pa.Array, path: str) -> pa.Array:
    """A dictionary's distinct values as literals, encoded once, null as ``none``."""
    batch = pa.record_batch([values], names=[path])
    text, ends = rows(batch, encoder.options, encoder.stats, [""], "")
    return text_array(text, ends)


def _local_time(encoder: reference._ArrowEncoder, arr: pa.Array, path: str) -> pa.Array:
    """A zoned timestamp column as naive wall-clock time in the display zone: the
    reference's own steps, so that out-of-range values are counted alike."""
    unit = arr.type.unit
    arr = encoder._out_of_range(arr, arr.view(pa.int64()), *reference.tick_range(unit), path)
    zoned = arr.cast(pa.timestamp(unit, encoder.options.timezone))
    return pc.local_timestamp(zoned)
