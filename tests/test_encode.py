"""The encoder against the real Typst compiler, and against the per-value reference."""

from __future__ import annotations

import datetime as dt
import decimal

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings

from ashstream import (
    EncodeError,
    EncodeOptions,
    EncodeStats,
    UnsupportedTypeError,
    encode_array,
    encode_rows,
    encode_value,
)
from ashstream import encode as encode_module
from ashstream.encode import TIME_TABLE_MIN_ROWS
from tests.encoders import ENCODERS, encoder
from tests.reference import assert_same, reference_literal, to_model
from tests.strategies import arrays, tables
from tests.typst_roundtrip import evaluate

UTC = EncodeOptions()
D = decimal.Decimal


@pytest.fixture(autouse=True, params=ENCODERS)
def each_encoder(request):
    """Every test here runs under both encoders, except those of the reference's own
    internals (marked reference_only)."""
    if request.param == "native" and request.node.get_closest_marker("reference_only"):
        pytest.skip("tests the reference encoder's internals")
    with encoder(request.param):
        yield request.param


def check(arr: pa.Array | pa.ChunkedArray, options: EncodeOptions = UTC) -> list[str]:
    """Vectorised == reference byte for byte, and Typst gives back the same values."""
    got = encode_array(arr, options=options).to_pylist()
    flat = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    models = to_model(flat, options)
    assert got == [reference_literal(m, options) for m in models]
    values = evaluate(got)
    assert len(values) == len(models)
    for i, (value, model) in enumerate(zip(values, models, strict=True)):
        assert_same(value, model, options, f"[{i}]")
    return got


def ints(values: list[int | None], type_: pa.DataType) -> pa.Array:
    """An array of a temporal ``type_`` from raw epoch integers."""
    width = pa.int32() if type_.bit_width == 32 else pa.int64()
    return pa.array(values, width).cast(type_)


CASES = [
    pytest.param(pa.nulls(3), ["none"] * 3, id="null-type"),
    pytest.param(pa.array([True, False, None]), ["true", "false", "none"], id="bool"),
    pytest.param(pa.array([-128, 127, None], pa.int8()), ["-128", "127", "none"], id="int8"),
    pytest.param(
        pa.array([-(2**63), 2**63 - 1, 0]),
        ["(-9223372036854775807 - 1)", "9223372036854775807", "0"],
        id="int64-limits",
    ),
    pytest.param(pa.array([0, 2**32 - 1], pa.uint32()), ["0", "4294967295"], id="uint32"),
    pytest.param(
        pa.array([2**64 - 1, 2**63, 2**63 - 1], pa.uint64()),
        [
            'decimal("18446744073709551615")',
            'decimal("9223372036854775808")',
            "9223372036854775807",
        ],
        id="uint64-above-i64",
    ),
    pytest.param(
        pa.array(
            [
                1.0,
                -0.0,
                0.1,
                1e16,
                1e-7,
                5e-324,
                1e10,
                9999999999.0,
                1.7976931348623157e308,
                float("nan"),
                float("inf"),
                -float("inf"),
                123456.789,
                2.0**53,
            ]
        ),
        [
            "1.0",
            "-0.0",
            "0.1",
            "1e+16",
            "1e-7",
            "5e-324",
            "1e+10",
            "9999999999.0",
            "1.7976931348623157e+308",
            "float.nan",
            "float.inf",
            "-float.inf",
            "123456.789",
            "9.007199254740992e+15",
        ],
        id="float64",
    ),
    pytest.param(
        pa.array(np.array([0.1, 1e10, 16777216, -0.0, 3.4028235e38], np.float32)),
        ["0.1", "1e+10", "16777216.0", "-0.0", "3.4028235e+38"],
        id="float32",
    ),
    pytest.param(
        pa.array(np.array([0.1, 65504, -0.0], np.float16)),
        ["0.099975586", "65504.0", "-0.0"],
        id="float16",
    ),
    pytest.param(
        pa.array([D("1.50"), D("-0.01"), D("0"), None], pa.decimal128(5, 2)),
        ['decimal("1.50")', 'decimal("-0.01")', 'decimal("0.00")', "none"],
        id="decimal",
    ),
    pytest.param(
        pa.array([D("1.23E+4"), D("-5E+2")], pa.decimal128(3, -2)),
        ['decimal("12300")', 'decimal("-500")'],
        id="decimal-negative-scale",
    ),
    pytest.param(
        pa.array(
            [D("79228162514264337593543950335"), D("79228162514264337593543950336"), D(10**37)],
            pa.decimal128(38, 0),
        ),
        [
            'decimal("79228162514264337593543950335")',
            'float("79228162514264337593543950336")',
            'float("10000000000000000000000000000000000000")',
        ],
        id="decimal-hugeint-limit",
    ),
    pytest.param(
        pa.array([D("0.0000000000000000000000000001"), D("1")], pa.decimal128(29, 28)),
        ['decimal("0.0000000000000000000000000001")', 'decimal("1.0000000000000000000000000000")'],
        id="decimal-scale-28",
    ),
    pytest.param(
        pa.array([D("1E-29")], pa.decimal128(30, 29)),
        ['float("0.00000000000000000000000000001")'],
        id="decimal-scale-29",
    ),
    pytest.param(
        pa.array([D("-12.5")], pa.decimal256(60, 1)), ['decimal("-12.5")'], id="decimal256"
    ),
    pytest.param(pa.array([D("1.5")], pa.decimal32(3, 1)), ['decimal("1.5")'], id="decimal32"),
    pytest.param(
        pa.array(
            [
                'A "B"',
                "back\\slash",
                "a\nb\rc\td",
                "\x00\x01\x1b\x7f",
                "\\n",
                "\\u{41}",
                "#$[]{}*_`<>@// /*",
                "é😀データ\u2028\ufeff",
                "",
            ]
        ),
        [
            '"A \\"B\\""',
            '"back\\\\slash"',
            '"a\\nb\\rc\\td"',
            '"\\u{0}\\u{1}\\u{1b}\\u{7f}"',
            '"\\\\n"',
            '"\\\\u{41}"',
            '"#$[]{}*_`<>@// /*"',
            '"é😀データ\u2028\ufeff"',
            '""',
        ],
        id="string-escapes",
    ),
    pytest.param(pa.array(["x", None], pa.large_string()), ['"x"', "none"], id="large-string"),
    pytest.param(pa.array(["x", "y\n"], pa.string_view()), ['"x"', '"y\\n"'], id="string-view"),
    pytest.param(
        pa.array([b"", b"\x07", b"\x00\xff\x61", None]),
        ["bytes(())", "bytes((7,))", "bytes((0, 255, 97))", "none"],
        id="binary",
    ),
    pytest.param(pa.array([b"ab"], pa.large_binary()), ["bytes((97, 98))"], id="large-binary"),
    pytest.param(
        pa.array([b"ab", None, b"\x00\x01"], pa.binary(2)),
        ["bytes((97, 98))", "none", "bytes((0, 1))"],
        id="fixed-size-binary",
    ),
    pytest.param(pa.array([b"a"], pa.binary_view()), ["bytes((97,))"], id="binary-view"),
    pytest.param(
        ints([19762, 0, -1, -4371587, 2932896], pa.date32()),
        [
            "datetime(year: 2024, month: 2, day: 9)",
            "datetime(year: 1970, month: 1, day: 1)",
            "datetime(year: 1969, month: 12, day: 31)",
            "datetime(year: -9999, month: 1, day: 1)",
            "datetime(year: 9999, month: 12, day: 31)",
        ],
        id="date32-limits",
    ),
    pytest.param(
        ints([-4371588, 2932897, 2**31 - 1, -(2**31)], pa.date32()),
        ["none"] * 4,
        id="date32-out-of-range",
    ),
    pytest.param(
        ints([-1, 86_400_000 + 5], pa.date64()),
        ["datetime(year: 1969, month: 12, day: 31)", "datetime(year: 1970, month: 1, day: 2)"],
        id="date64",
    ),
    pytest.param(
        ints([-1, 0, 1_500_000, -1_500_000], pa.timestamp("us")),
        [
            "datetime(year: 1969, month: 12, day: 31, hour: 23, minute: 59, second: 59)",
            "datetime(year: 1970, month: 1, day: 1, hour: 0, minute: 0, second: 0)",
            "datetime(year: 1970, month: 1, day: 1, hour: 0, minute: 0, second: 1)",
            "datetime(year: 1969, month: 12, day: 31, hour: 23, minute: 59, second: 58)",
        ],
        id="timestamp-us-before-1970",
    ),
    pytest.param(
        ints([-(2**63) + 1, 2**63 - 1], pa.timestamp("ns")),
        [
            "datetime(year: 1677, month: 9, day: 21, hour: 0, minute: 12, second: 43)",
            "datetime(year: 2262, month: 4, day: 11, hour: 23, minute: 47, second: 16)",
        ],
        id="timestamp-ns-limits",
    ),
    pytest.param(
        ints([253402300799, 253402300800, -377705116800, -377705116801], pa.timestamp("s")),
        [
            "datetime(year: 9999, month: 12, day: 31, hour: 23, minute: 59, second: 59)",
            "none",
            "datetime(year: -9999, month: 1, day: 1, hour: 0, minute: 0, second: 0)",
            "none",
        ],
        id="timestamp-s-range",
    ),
    pytest.param(
        ints([2**62, -(2**62)], pa.timestamp("ms")),
        ["none", "none"],
        id="timestamp-ms-out-of-range",
    ),
    pytest.param(
        ints([0, 1_700_000_000_123], pa.timestamp("ms", "UTC")),
        [
            "datetime(year: 1970, month: 1, day: 1, hour: 0, minute: 0, second: 0)",
            "datetime(year: 2023, month: 11, day: 14, hour: 22, minute: 13, second: 20)",
        ],
        id="timestamp-tz-utc",
    ),
    pytest.param(
        ints([0], pa.timestamp("s", "Asia/Tokyo")),
        ["datetime(year: 1970, month: 1, day: 1, hour: 0, minute: 0, second: 0)"],
        id="timestamp-tz-shown-in-utc",
    ),
    pytest.param(
        ints([0, 45_296, 86_399, 86_400, None], pa.time32("s")),
        [
            "datetime(hour: 0, minute: 0, second: 0)",
            "datetime(hour: 12, minute: 34, second: 56)",
            "datetime(hour: 23, minute: 59, second: 59)",
            "none",
            "none",
        ],
        id="time32-s",
    ),
    pytest.param(
        ints([45_296_999], pa.time32("ms")),
        ["datetime(hour: 12, minute: 34, second: 56)"],
        id="time32-ms",
    ),
    pytest.param(
        ints([1, 86_399_999_999_999], pa.time64("ns")),
        ["datetime(hour: 0, minute: 0, second: 0)", "datetime(hour: 23, minute: 59, second: 59)"],
        id="time64-ns",
    ),
    pytest.param(
        ints([-5, 0, -(2**63), 2**63 - 1], pa.duration("s")),
        [
            "duration(seconds: -5)",
            "duration(seconds: 0)",
            "duration(seconds: (-9223372036854775807 - 1))",
            "duration(seconds: 9223372036854775807)",
        ],
        id="duration-s",
    ),
    pytest.param(
        ints([-1, 1_500_000, 3_000_000], pa.duration("us")),
        [
            "(duration(seconds: -1) + duration(seconds: 1) / 1000000000 * 999999000)",
            "(duration(seconds: 1) + duration(seconds: 1) / 1000000000 * 500000000)",
            "duration(seconds: 3)",
        ],
        id="duration-us-subseconds",
    ),
    pytest.param(
        ints([1, -(2**63)], pa.duration("ns")),
        [
            "(duration(seconds: 0) + duration(seconds: 1) / 1000000000 * 1)",
            "(duration(seconds: -9223372037) + duration(seconds: 1) / 1000000000 * 145224192)",
        ],
        id="duration-ns",
    ),
    pytest.param(
        pa.array(
            [pa.MonthDayNano([1, 2, 3]), pa.MonthDayNano([-1, 0, -(2**63)]), None],
            pa.month_day_nano_interval(),
        ),
        [
            "(months: 1, days: 2, nanoseconds: 3)",
            "(months: -1, days: 0, nanoseconds: (-9223372036854775807 - 1))",
            "none",
        ],
        id="interval",
    ),
    pytest.param(
        pa.array([[], [1], [1, 2], None, [None]]),
        ["()", "(1,)", "(1, 2)", "none", "(none,)"],
        id="list",
    ),
    pytest.param(
        pa.array([["a"], []], pa.large_list(pa.string())), ['("a",)', "()"], id="large-list"
    ),
    pytest.param(
        pa.array([[1, 2], None, [3, None]], pa.list_(pa.int8(), 2)),
        ["(1, 2)", "none", "(3, none)"],
        id="fixed-size-list",
    ),
    pytest.param(pa.array([[1], []], pa.list_view(pa.int64())), ["(1,)", "()"], id="list-view"),
    pytest.param(
        pa.array([[[1], []], [[]], []], pa.list_(pa.list_(pa.int64()))),
        ["((1,), ())", "((),)", "()"],
        id="nested-list",
    ),
    pytest.param(
        pa.array(
            [{"a": 1, "my key": "x", "if": True}, None, {"a": None, "my key": None, "if": None}]
        ),
        ['("a": 1, "my key": "x", "if": true)', "none", '("a": none, "my key": none, "if": none)'],
        id="struct",
    ),
    pytest.param(pa.array([{}, {}], pa.struct([])), ["(:)", "(:)"], id="struct-empty"),
    pytest.param(
        pa.array([[("a", 1), ('"q"', 2)], [], None], pa.map_(pa.string(), pa.int64())),
        ['("a": 1, "\\"q\\"": 2)', "(:)", "none"],
        id="map-string-keys",
    ),
    pytest.param(
        pa.array([[(1, "one")], [], [(2, "x"), (3, None)]], pa.map_(pa.int64(), pa.string())),
        ['((key: 1, value: "one"),)', "()", '((key: 2, value: "x"), (key: 3, value: none))'],
        id="map-int-keys",
    ),
    pytest.param(
        pa.array(["x", "y", None, "x"]).dictionary_encode(),
        ['"x"', '"y"', "none", '"x"'],
        id="dictionary",
    ),
    pytest.param(
        pa.DictionaryArray.from_arrays(pa.array([0, 1, None], pa.int8()), pa.array(["a", None])),
        ['"a"', "none", "none"],
        id="dictionary-null-in-values",
    ),
    pytest.param(
        pa.RunEndEncodedArray.from_arrays(pa.array([2, 3], pa.int32()), pa.array([7, 8])),
        ["7", "7", "8"],
        id="run-end-encoded",
    ),
    pytest.param(pa.chunked_array([[1, 2], [], [3]]), ["1", "2", "3"], id="chunked"),
]


@pytest.mark.parametrize(("arr", "expected"), CASES)
def test_every_type_round_trips_through_typst(arr, expected):
    assert check(arr) == expected


SLICED = [
    pytest.param(pa.array([[1], [2, 3], None, [], [4]])[1:4], id="list"),
    pytest.param(
        pa.array([[1, 2], [3, 4], None, [5, 6]], pa.list_(pa.int64(), 2))[1:], id="fixed-list"
    ),
    pytest.param(pa.array([{"a": 1}, {"a": 2}, None, {"a": 3}])[1:3], id="struct"),
    pytest.param(
        pa.array([[("a", 1)], [("b", 2), ("c", 3)], [], None], pa.map_(pa.string(), pa.int64()))[
            1:
        ],
        id="map",
    ),
    pytest.param(
        pa.array([[(1, 2)], [(3, 4)], None], pa.map_(pa.int8(), pa.int8()))[1:], id="map-int-keys"
    ),
    pytest.param(pa.array([b"a", b"bc", None, b"d"])[1:], id="binary"),
    pytest.param(pa.array([b"ab", b"cd", b"ef"], pa.binary(2))[1:], id="fixed-binary"),
    pytest.param(pa.array(["a", 'b"', None, "c\n"])[2:], id="string"),
    pytest.param(
        pa.array(
            [pa.MonthDayNano([1, 2, 3]), pa.MonthDayNano([4, 5, 6])], pa.month_day_nano_interval()
        )[1:],
        id="interval",
    ),
    pytest.param(pa.array(["x", "y", "x"]).dictionary_encode()[1:], id="dictionary"),
    pytest.param(ints([1, 2, 3], pa.timestamp("s"))[2:], id="timestamp"),
]


@pytest.mark.parametrize("arr", SLICED)
def test_sliced_arrays_encode_only_their_window(arr):
    literals = check(arr)
    assert len(literals) == len(arr)


def test_repeated_values_are_encoded_once_and_gathered():
    # Large enough for the low-cardinality string path; dates and times always take it.
    n = 6000
    strings = pa.array((['a"', None, "b\n", "\x01c", "\\"] * n)[:n])
    days = pa.array([(i % 7) * 1000 - 3000 if i % 5 else None for i in range(n)], pa.int32())
    stamps = pa.array([(i % 11) * 86_399_999_999 - 5 if i % 3 else None for i in range(n)])
    for arr in (strings, days.cast(pa.date32()), stamps.cast(pa.timestamp("us"))):
        literals = encode_array(arr).to_pylist()
        assert literals == [reference_literal(m, UTC) for m in to_model(arr, UTC)]
    assert check(strings)[:5] == ['"a\\""', "none", '"b\\n"', '"\\u{1}c"', '"\\\\"']


@pytest.mark.reference_only
def test_times_of_day_of_a_big_batch_come_from_the_table_and_equal_the_reference():
    """A batch of TIME_TABLE_MIN_ROWS or more gathers each time of day from a table of
    all 86,400 built once; every second of the day, nulls, before 1970 and after."""
    n = TIME_TABLE_MIN_ROWS + 90_000
    step = 86_400 * 1_000_000 * 400 // n + 7  # 400 days of microseconds, odd seconds
    stamps = pa.array(
        [None if i % 97 == 0 else (i - n // 2) * step for i in range(n)], pa.timestamp("us")
    )
    times = pa.array([*range(86_400), None, *range(0, 86_400, 7)], pa.time32("s"))
    encode_module._TIME_OF_DAY_TABLES.clear()  # another test may have built them
    small = stamps.slice(0, TIME_TABLE_MIN_ROWS - 1)  # computed: no table yet
    assert encode_array(small).to_pylist() == [
        reference_literal(m, UTC) for m in to_model(small, UTC)
    ]
    assert encode_module._TIME_OF_DAY_TABLES == {}
    for arr in (stamps, times, stamps.cast(pa.timestamp("us", "Europe/Berlin"))):
        literals = encode_array(arr).to_pylist()
        assert literals == [reference_literal(m, UTC) for m in to_model(arr, UTC)]
    assert len(encode_module._TIME_OF_DAY_TABLES) == 2  # ", hour: " and "datetime(hour: "
    assert len(set(encode_array(times).to_pylist())) == 86_401  # every second, and none
    check(stamps.slice(n // 2 - 50, 100))  # Typst reads them


def test_timestamps_with_a_zone_are_shown_in_the_display_zone():
    arr = ints([0, 1_719_792_000], pa.timestamp("s", "UTC"))  # 2024-07-01 00:00 UTC
    ny = EncodeOptions(timezone="America/New_York")
    assert check(arr, ny) == [
        "datetime(year: 1969, month: 12, day: 31, hour: 19, minute: 0, second: 0)",
        "datetime(year: 2024, month: 6, day: 30, hour: 20, minute: 0, second: 0)",
    ]
    # a naive timestamp is wall-clock time already and is left alone
    naive = ints([0], pa.timestamp("s"))
    assert encode_array(naive, options=ny).to_pylist() == [
        "datetime(year: 1970, month: 1, day: 1, hour: 0, minute: 0, second: 0)"
    ]


def test_display_zone_can_push_a_timestamp_out_of_range():
    last_second = 253402300799  # 9999-12-31 23:59:59 UTC, in year 10000 in Tokyo
    stats = EncodeStats()
    arr = ints([last_second], pa.timestamp("s", "UTC"))
    out = encode_array(arr, options=EncodeOptions(timezone="Asia/Tokyo"), stats=stats)
    assert out.to_pylist() == ["none"]
    assert stats.total == 1


def test_out_of_range_values_are_counted_per_column():
    stats = EncodeStats()
    table = pa.table(
        {
            "d": ints([0, 2**31 - 1, -(2**31)], pa.date32()),
            "t": ints([0, 86_400], pa.time32("s")).take([0, 1, 1]),
            "ok": [1, 2, 3],
        }
    )
    encode_rows(table, stats=stats)
    assert dict(stats.counts) == {
        ("d", "value(s) outside Typst's datetime range became none"): 2,
        ("t", "value(s) outside Typst's datetime range became none"): 2,
    }
    assert stats.messages()[0].startswith("column 'd': 2 value(s) outside")


def test_decimal_overflow_policies():
    arr = pa.array([D("1"), D(2**96)], pa.decimal128(38, 0))
    stats = EncodeStats()
    assert check(arr, EncodeOptions(decimal_overflow="string")) == [
        'decimal("1")',
        '"79228162514264337593543950336"',
    ]
    encode_array(arr, options=EncodeOptions(decimal_overflow="string"), stats=stats)
    assert stats.total == 1
    with pytest.raises(
        EncodeError,
        match=r"column 'amount': decimal 79228162514264337593543950336 "
        r"is beyond Typst's decimal range",
    ):
        encode_array(arr, options=EncodeOptions(decimal_overflow="error"), name="amount")


def test_encode_rows_quotes_keys_in_column_order():
    table = pa.table(
        {
            "id": [1, 2],
            "name": ['A "B"', None],
            "day": ints([19762, None], pa.date32()),
        }
    )
    rows = encode_rows(table).to_pylist()
    assert rows == [
        '("id": 1, "name": "A \\"B\\"", "day": datetime(year: 2024, month: 2, day: 9))',
        '("id": 2, "name": none, "day": none)',
    ]
    values = evaluate(rows)
    assert_same(
        values[0], {"id": 1, "name": 'A "B"', "day": to_model(table["day"].chunk(0), UTC)[0]}, UTC
    )


def test_encode_rows_of_a_record_batch_and_of_no_columns():
    batch = pa.record_batch({"if": [True], "": [None]})
    assert encode_rows(batch).to_pylist() == ['("if": true, "": none)']
    assert encode_rows(pa.table({"a": [1, 2]}).drop_columns(["a"])).to_pylist() == ["(:)"] * 2
    empty_schema = pa.RecordBatch.from_pydict({}, schema=pa.schema([]))
    assert encode_rows(empty_schema).to_pylist() == []


def test_encode_rows_refuses_duplicate_column_names():
    table = pa.Table.from_arrays([pa.array([1]), pa.array([2])], names=["a", "a"])
    with pytest.raises(EncodeError, match="column name 'a' appears twice"):
        encode_rows(table)


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        (None, "none"),
        (True, "true"),
        (0, "0"),
        (-(2**63), "(-9223372036854775807 - 1)"),
        (2**64 - 1, 'decimal("18446744073709551615")'),
        (2**100, 'float("1267650600228229401496703205376")'),
        (1.0, "1.0"),
        (-0.0, "-0.0"),
        (1e-5, "0.00001"),
        (1e15, "1e+15"),
        (float("nan"), "float.nan"),
        (np.float32(0.1), "0.1"),
        (np.int16(-3), "-3"),
        (D("1.23E+4"), 'decimal("12300")'),
        (D("NaN"), "float.nan"),
        ('a"\\', '"a\\"\\\\"'),
        (b"\x07", "bytes((7,))"),
        (bytearray(b""), "bytes(())"),
        (dt.date(2024, 2, 9), "datetime(year: 2024, month: 2, day: 9)"),
        (
            dt.datetime(2024, 2, 9, 1, 2, 3, 999999),
            "datetime(year: 2024, month: 2, day: 9, hour: 1, minute: 2, second: 3)",
        ),
        (
            dt.datetime(2024, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=2))),
            "datetime(year: 2023, month: 12, day: 31, hour: 22, minute: 0, second: 0)",
        ),
        (dt.time(1, 2, 3, 4), "datetime(hour: 1, minute: 2, second: 3)"),
        (
            dt.timedelta(seconds=-1, microseconds=1),
            "(duration(seconds: -1) + duration(seconds: 1) / 1000000000 * 1000)",
        ),
        ([], "()"),
        ([1], "(1,)"),
        ((1, "a"), '(1, "a")'),
        ({}, "(:)"),
        ({"a": [None]}, '("a": (none,))'),
        ({1: "x"}, '((key: 1, value: "x"),)'),
        (pa.scalar(5, pa.int8()), "5"),
        (pa.scalar(2**64 - 1, pa.uint64()), 'decimal("18446744073709551615")'),
    ],
    ids=repr,
)
def test_encode_value(value, literal):
    assert encode_value(value) == literal
    assert evaluate([literal])[0][0] != "other"


def test_encode_value_rejects_unknown_objects():
    with pytest.raises(EncodeError, match="cannot encode a Python set"):
        encode_value({1, 2})


# ----------------------------------------------------------------------------- errors


def test_union_is_unsupported_with_a_fix():
    union = pa.UnionArray.from_sparse(
        pa.array([0, 1], pa.int8()), [pa.array([1, 2]), pa.array(["a", "b"])]
    )
    table = pa.table({"choice": union})
    with pytest.raises(UnsupportedTypeError) as err:
        encode_rows(table)
    message = str(err.value)
    assert "column 'choice'" in message
    assert "sparse_union" in message
    assert "CAST(choice AS VARCHAR)" in message


def test_opaque_extension_is_unsupported():
    opaque = pa.opaque(pa.binary(), "varint", "duckdb")
    arr = pa.ExtensionArray.from_storage(opaque, pa.array([b"\x01"]))
    with pytest.raises(UnsupportedTypeError, match=r"column 'big' of type extension<arrow.opaque"):
        encode_array(arr, name="big")


def test_nested_unsupported_type_names_the_path():
    union = pa.UnionArray.from_sparse(pa.array([0], pa.int8()), [pa.array([1])])
    arr = pa.StructArray.from_arrays([union], ["inner"])
    with pytest.raises(UnsupportedTypeError, match=r"column 'outer.inner'"):
        encode_array(arr, name="outer")


def test_duplicate_struct_field_names_are_an_error():
    arr = pa.StructArray.from_arrays([pa.array([1]), pa.array(["x"])], ["a", "a"])
    with pytest.raises(
        UnsupportedTypeError,
        match=r"column 's' of type struct<a: int64, a: string>: field name 'a' "
        r"appears twice",
    ):
        encode_array(arr, name="s")


def test_duplicate_map_keys_are_an_error():
    arr = pa.MapArray.from_arrays(
        pa.array([0, 2], pa.int32()), pa.array(["k", "k"]), pa.array([1, 2])
    )
    with pytest.raises(EncodeError, match=r"column 'm'.*key 'k' appears twice in one map"):
        encode_array(arr, name="m")


def test_invalid_utf8_names_column_and_row():
    bad = pa.Array.from_buffers(
        pa.string(),
        2,
        [None, pa.py_buffer(np.array([0, 1, 3], np.int32)), pa.py_buffer(b"a\xff\xfe")],
    )
    with pytest.raises(EncodeError, match=r"column 'name', row 1: invalid UTF-8"):
        encode_array(bad, name="name")


def test_bad_options_are_refused():
    with pytest.raises(EncodeError, match="unknown time zone 'Mars/Olympus'"):
        EncodeOptions(timezone="Mars/Olympus")
    with pytest.raises(EncodeError, match="decimal_overflow must be"):
        EncodeOptions(decimal_overflow="round")


# --------------------------------------------------------------------- property tests


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays())
def test_vectorised_path_equals_reference(arr):
    got = encode_array(arr).to_pylist()
    assert got == [reference_literal(m, UTC) for m in to_model(arr, UTC)]


@pytest.mark.slow
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays())
def test_random_arrays_round_trip_through_typst(arr):
    check(arr)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables())
def test_random_tables_round_trip_through_typst(table):
    rows = encode_rows(table).to_pylist()
    columns = {name: to_model(table[name].combine_chunks(), UTC) for name in table.column_names}
    expected = [
        {name: columns[name][i] for name in table.column_names} for i in range(table.num_rows)
    ]
    assert rows == [reference_literal(e, UTC) for e in expected]
    for i, (value, want) in enumerate(zip(evaluate(rows), expected, strict=True)):
        assert_same(value, want, UTC, f"row {i}")
