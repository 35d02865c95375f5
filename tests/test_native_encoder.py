"""The compiled encoder against the reference, byte for byte, on every type and option.

The reference (ashstream.encode, pyarrow.compute) is what tests/test_encode.py checks
against the Typst compiler; here the native join must give the same text, the same
counts of lossy values and the same errors, for random arrays and tables of every type
(tests/strategies.py) and for the edges the C code handles itself. scripts/sanitize.sh
runs this module under AddressSanitizer and UndefinedBehaviorSanitizer.
"""

from __future__ import annotations

import decimal
import os
import struct
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ashstream import encode as encode_module
from ashstream import encode_native
from ashstream.encode import EncodeOptions, EncodeStats, format_float
from tests.conftest import mixed_sql, write_report
from tests.encoders import encoder
from tests.strategies import arrays, tables

if not encode_native.available():
    if os.environ.get("ASHSTREAM_REQUIRE_NATIVE") == "1":
        raise RuntimeError("ASHSTREAM_REQUIRE_NATIVE=1 but ashstream._encoder is not built")
    pytest.skip("the compiled encoder is not built here", allow_module_level=True)

from ashstream import _encoder  # after the skip: it may not exist

OPTIONS = st.builds(
    EncodeOptions,
    timezone=st.sampled_from(["UTC", "America/New_York", "Asia/Kolkata", "Pacific/Chatham"]),
    decimal_overflow=st.sampled_from(["float", "string", "error"]),
)
ENCODERS = ("reference", "native")


def outcome(run: Callable[[EncodeStats], object]) -> tuple:
    """What ``run`` gives, counts of lossy values included, or the error it raises."""
    stats = EncodeStats()
    try:
        return ("ok", run(stats), dict(stats.counts))
    except Exception as exc:  # the same exception, same message, from both
        return ("error", type(exc).__name__, str(exc))


def same_from_both(run: Callable[[EncodeStats], object]) -> tuple:
    results = {}
    for name in ENCODERS:
        with encoder(name):
            results[name] = outcome(run)
    assert results["native"] == results["reference"]
    return results["native"]


def rows_text(batch: pa.RecordBatch | pa.Table, options: EncodeOptions):
    def run(stats: EncodeStats) -> tuple[bytes, list[int]]:
        text, ends = encode_module.encode_rows_text(batch, options=options, stats=stats)
        return text.to_pybytes(), [int(e) for e in ends]

    return run


slow = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@slow
@given(arrays(), OPTIONS)
def test_random_arrays_encode_alike(arr, options):
    same_from_both(
        lambda stats: encode_module.encode_array(arr, options=options, stats=stats).to_pylist()
    )


@slow
@given(tables(), OPTIONS)
def test_random_tables_encode_alike(table, options):
    same_from_both(rows_text(table, options))
    for batch in table.to_batches():
        same_from_both(rows_text(batch, options))
        same_from_both(
            lambda stats, b=batch: encode_module.encode_rows(
                b, options=options, stats=stats
            ).to_pylist()
        )


@settings(max_examples=200, deadline=None)
@given(st.lists(arrays(n=5, depth=1), min_size=1, max_size=6), OPTIONS)
def test_random_batches_of_many_columns_encode_alike(columns, options):
    batch = pa.record_batch(columns, names=[f"c{i}" for i in range(len(columns))])
    same_from_both(rows_text(batch, options))


def test_every_float64_bit_pattern_sampled_formats_as_the_reference():
    """Shortest digits (Ryu) against repr-based format_float: random bit patterns cover
    subnormals, huge and tiny exponents; decimal fractions cover the short cases."""
    rng = np.random.default_rng(17)
    patterns = rng.integers(0, 2**64, size=200_000, dtype=np.uint64)
    values = list(patterns.view(np.float64))
    values += list(
        rng.integers(-(10**7), 10**7, 100_000) / rng.choice([1, 7, 10, 100, 1e6], 100_000)
    )
    values += [0.0, -0.0, 5e-324, -5e-324, 2.2250738585072014e-308, 1.7976931348623157e308]
    values += [1e22, 1e23, 9007199254740993.0, 2.0**53, 2.0**63, 0.1, 0.3, 1e-7, 1.5e-7, 1e-6]
    values += [9999999999.0, 1e9, 1e10, 123456789.0, 0.000001234, 1e16, 1e15, 4.35, 2.675]
    values += [struct.unpack("<d", struct.pack("<Q", 2**52 * k))[0] for k in range(1, 2046, 7)]
    wrong = [v for v in values if _encoder.format_double(float(v)) != format_float(float(v))]
    assert wrong == []


def test_column_kinds_the_c_join_writes_itself():
    """One column per type the C code formats, with the edges of each, in one batch."""
    big = 2**96 - 1
    columns = {
        "null": pa.nulls(4),
        "bool": pa.array([True, False, None, True]),
        "i8": pa.array([-128, 127, None, 0], pa.int8()),
        "i64": pa.array([-(2**63), 2**63 - 1, None, -1]),
        "u64": pa.array([0, 2**63 - 1, 2**63, 2**64 - 1], pa.uint64()),
        "f64": pa.array([float("nan"), float("-inf"), -0.0, 1e-320]),
        "dec": pa.array(
            [decimal.Decimal("-0.05"), None, decimal.Decimal("12.5"), decimal.Decimal(0)],
            pa.decimal128(5, 2),
        ),
        "dec_wide": pa.array(
            [decimal.Decimal(big), decimal.Decimal(big + 1), decimal.Decimal(-big - 1), None],
            pa.decimal128(38, 0),
        ),
        "dec_fine": pa.array(
            [decimal.Decimal("1e-30"), decimal.Decimal(0), None, decimal.Decimal("-3e-38")],
            pa.decimal128(38, 38),
        ),
        "dec32": pa.array(
            [decimal.Decimal("-1.5"), None, decimal.Decimal("99.9"), decimal.Decimal(0)],
            pa.decimal32(3, 1),
        ),
        "dec64": pa.array(
            [
                decimal.Decimal("-1.000000001"),
                None,
                decimal.Decimal("0.000000001"),
                decimal.Decimal(7),
            ],
            pa.decimal64(18, 9),
        ),
        "text": pa.array(['a"\\', "\x00\x01\x1b\x7f\t\n\r", None, "é😀\u2028"]),
        "large_text": pa.array(["", None, "x" * 1000, "\x1f"], pa.large_string()),
        "bin": pa.array([b"", b"\x00", b"\xff\x01", None]),
        "fixed": pa.array([b"ab", None, b"\x00\xff", b"zz"], pa.binary(2)),
        "d32": pa.array([-4_371_587, 2_932_896, 2_932_897, None], pa.int32()).cast(pa.date32()),
        "d64": pa.array([-1, 86_400_000 * 2_932_897, 0, None], pa.int64()).cast(pa.date64()),
        "ts_ns": pa.array([-(2**63), 2**63 - 1, -1, None], pa.int64()).cast(pa.timestamp("ns")),
        "ts_s": pa.array([-(2**63), 253402300799, 253402300800, -1], pa.int64()).cast(
            pa.timestamp("s")
        ),
        "ts_zoned": pa.array([0, 253402300799, -1, None], pa.int64()).cast(
            pa.timestamp("s", "UTC")
        ),
        "t32": pa.array([0, 86_399_999, 86_400_000, -1], pa.int32()).cast(pa.time32("ms")),
        "t64": pa.array([0, 86_399_999_999_999, 2**62, None], pa.int64()).cast(pa.time64("ns")),
        "dur_s": pa.array([-(2**63), 2**63 - 1, 0, None], pa.int64()).cast(pa.duration("s")),
        "dur_ns": pa.array([-(2**63), -1, 1_500_000_000, None], pa.int64()).cast(pa.duration("ns")),
        "dict": pa.array(["a", None, "b\n", "a"]).dictionary_encode(),
    }
    batch = pa.record_batch(list(columns.values()), names=list(columns))
    for zone in ("UTC", "Pacific/Kiritimati", "America/Anchorage"):
        for policy in ("float", "string"):
            result = same_from_both(rows_text(batch, EncodeOptions(zone, policy)))
            assert result[0] == "ok"
            for offset in range(1, 4):  # slices move every validity bit and offset
                same_from_both(rows_text(batch.slice(offset), EncodeOptions(zone, policy)))
    error = same_from_both(rows_text(batch, EncodeOptions(decimal_overflow="error")))
    assert error[0] == "error" and "dec_wide" in error[2]


def test_invalid_utf8_gives_the_reference_error():
    data = pa.py_buffer(b"ok\xff\xfeno")
    offsets = pa.py_buffer(np.array([0, 2, 4, 6], np.int32))
    bad = pa.StringArray.from_buffers(3, offsets, data)
    batch = pa.record_batch([pa.array([1, 2, 3]), bad], names=["n", "s"])
    result = same_from_both(rows_text(batch, EncodeOptions()))
    assert result[0] == "error" and "invalid UTF-8" in result[2]


def test_a_dictionary_of_invalid_utf8_or_bad_indices_gives_the_reference_error():
    bad = pa.StringArray.from_buffers(
        2, pa.py_buffer(np.array([0, 2, 4], np.int32)), pa.py_buffer(b"ok\xff\xfe")
    )
    invalid = pa.DictionaryArray.from_arrays(pa.array([0, 1, 0], pa.int32()), bad)
    result = same_from_both(rows_text(pa.record_batch([invalid], names=["c"]), EncodeOptions()))
    assert result[0] == "error" and "invalid UTF-8" in result[2]
    out_of_range = pa.DictionaryArray.from_arrays(
        pa.array([0, 5, None], pa.int32()), pa.array(["a", "b"]), safe=False
    )
    result = same_from_both(
        rows_text(pa.record_batch([out_of_range], names=["c"]), EncodeOptions())
    )
    assert result[0] == "error"


def test_big_strings_and_many_rows():
    rng = np.random.default_rng(3)
    words = ["plain", 'q"uote', "back\\slash", "new\nline", "\x00nul", "ünï", "x" * 300]
    strings = pa.array([words[i] for i in rng.integers(0, len(words), 50_000)])
    batch = pa.record_batch(
        [strings, pa.array(rng.standard_normal(50_000)), pa.array(rng.integers(-9, 9, 50_000))],
        names=["s", "f", "i"],
    )
    same_from_both(rows_text(batch, EncodeOptions()))
    same_from_both(rows_text(batch.slice(12_345, 20_000), EncodeOptions()))


def test_chunked_tables_encode_alike():
    table = pa.concat_tables([pa.table({"a": [1, None], "b": ["x", "y"]})] * 3)
    same_from_both(rows_text(table, EncodeOptions()))
    same_from_both(rows_text(pa.table({}), EncodeOptions()))
    same_from_both(rows_text(pa.table({"a": pa.array([], pa.int64())}), EncodeOptions()))


def test_unsupported_types_keep_the_reference_error():
    union = pa.UnionArray.from_sparse(
        pa.array([0, 1], pa.int8()), [pa.array([1, 2]), pa.array(["a", "b"])]
    )
    result = same_from_both(rows_text(pa.record_batch([union], names=["u"]), EncodeOptions()))
    assert result[0] == "error" and result[1] == "UnsupportedTypeError"


def test_the_environment_variable_chooses_the_encoder(monkeypatch):
    monkeypatch.setenv(encode_native.ENCODER_VARIABLE, "reference")
    assert encode_native.chosen() == "reference"
    monkeypatch.setenv(encode_native.ENCODER_VARIABLE, "native")
    assert encode_native.chosen() == "native"
    monkeypatch.delenv(encode_native.ENCODER_VARIABLE)
    assert encode_native.chosen() == "native"
    monkeypatch.setenv(encode_native.ENCODER_VARIABLE, "fast")
    with pytest.raises(Exception, match="must be 'native', 'reference' or unset, not 'fast'"):
        encode_native.chosen()


@pytest.mark.process
@pytest.mark.slow
def test_whole_runs_write_the_same_module_with_either_encoder(tmp_path):
    """``ashstream run`` in this process and on a pool, under each encoder: four
    byte-identical modules (groups, variables, nested and zoned values included)."""
    report = write_report(
        tmp_path,
        {
            "name": "mixed",
            "source": {"duckdb": {"query": mixed_sql(40_000)}},
            "groups": [{"name": "letter", "field": "letter"}],
            "variables": [
                {"name": "total", "function": "sum", "field": "amount", "reset": "letter"},
                {"name": "last_day", "function": "last", "field": "day", "reset": "report"},
            ],
            "pipeline": {"timezone": "America/New_York"},
        },
    )
    modules = {}
    for name in ENCODERS:
        for engine, flags in (
            ("inline", ["--inline-rows", "1000000"]),
            ("pool", ["--workers", "2"]),
        ):
            out = tmp_path / f"{name}-{engine}.typ"
            env = {**os.environ, encode_native.ENCODER_VARIABLE: name}
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "ashstream",
                    "run",
                    str(report),
                    "-q",
                    "-o",
                    str(out),
                    *flags,
                ],
                capture_output=True,
                text=True,
                timeout=120,
                env=env,
            )
            assert done.returncode == 0, done.stderr
            modules[(name, engine)] = out.read_bytes()
    first = modules[("reference", "inline")]
    assert b"datetime(" in first and b"groups" in first
    assert all(module == first for module in modules.values())


def test_the_c_join_refuses_buffers_shorter_than_the_array_needs():
    """Python validates first; the C code checks again every offset, index and length
    against the buffers' sizes, so a malformed array is refused, never read past."""

    def spec(array, sizes=None):
        sizes = sizes or encode_native._sizes(array)
        return (*array.__arrow_c_array__(), False, b"", *sizes)

    none = (0, 0, 0)
    with_nulls = pa.array([1, None] * 10, pa.int8())
    bad = [  # (array, the buffer sizes the C code is told, when not the real ones)
        (pa.array([1, 2, 3, 4]), ((0, 8, 0), none)),  # 4 int64 need 32 bytes
        (with_nulls, ((1, 20, 0), none)),  # 20 validity bits need 3 bytes
        (pa.array(["ab", "c"]), ((0, 8, 3), none)),  # 3 offsets need 12 bytes
        (pa.array(["ab", "c"]), ((0, 12, 2), none)),  # the last offset is past the data
        (
            pa.Array.from_buffers(
                pa.string(),
                2,
                [None, pa.py_buffer(np.array([0, 2, 1], np.int32)), pa.py_buffer(b"ab")],
            ),
            None,
        ),  # offsets going down
    ]
    for array, sizes in bad:
        with pytest.raises(ValueError, match="native encoder"):
            _encoder.encode_rows([spec(array, sizes)], b"", len(array), 0)
    good = pa.array(["ab", None])
    text, ends, _ = _encoder.encode_rows([spec(good)], b"", 2, 0)
    assert bytes(text) == b'"ab"none' and list(np.frombuffer(ends, np.int64)) == [0, 4, 8]
