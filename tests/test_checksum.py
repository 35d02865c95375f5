"""The cache's checksums against zlib: the C fold (ashstream._checksum) gives zlib.crc32's
value for every length, alignment and starting value, and crc32_combine joins two
texts' checksums as zlib would checksum them one after the other.

A wrong fold or combine would not show in a run's output: every entry would just be
found damaged and recomputed. Hence these direct tests."""

from __future__ import annotations

import os
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ashstream import checksum
from ashstream.checksum import crc32, crc32_combine

if os.environ.get("ASHSTREAM_REQUIRE_NATIVE") == "1" and not checksum.native():
    raise RuntimeError("ASHSTREAM_REQUIRE_NATIVE=1 but ashstream._checksum is not in use")

VALUES = st.integers(0, 2**32 - 1)


@pytest.mark.parametrize("length", [*range(0, 200), 1023, 1024, 1025, 65536 + 13, 2**22 + 5])
def test_crc32_is_zlibs_at_every_length(length):
    data = os.urandom(length)
    assert crc32(data) == zlib.crc32(data)
    assert crc32(data, 0xDEADBEEF) == zlib.crc32(data, 0xDEADBEEF)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=5000), start=st.integers(0, 15), value=VALUES)
def test_crc32_is_zlibs_at_any_alignment_and_start_value(data, start, value):
    view = memoryview(bytearray(data))[start:]  # not 16-byte aligned, and writable
    assert crc32(view, value) == zlib.crc32(view, value)


def test_crc32_runs_on_in_pieces_as_zlib_does():
    data = os.urandom(100_000)
    crc = 0
    for at in range(0, len(data), 777):
        crc = crc32(data[at : at + 777], crc)
    assert crc == zlib.crc32(data)


def test_crc32_refuses_what_is_not_a_buffer():
    with pytest.raises(TypeError):
        crc32("text")


@settings(max_examples=200, deadline=None)
@given(first=st.binary(max_size=3000), second=st.binary(max_size=3000))
def test_combine_is_the_checksum_of_both_texts(first, second):
    combined = crc32_combine(zlib.crc32(first), zlib.crc32(second), len(second))
    assert combined == zlib.crc32(first + second)


def test_combine_of_a_long_second_text():
    first, second = os.urandom(10), os.urandom(3_000_001)
    assert crc32_combine(crc32(first), crc32(second), len(second)) == zlib.crc32(first + second)
