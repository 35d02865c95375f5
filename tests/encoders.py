"""Running a test under each encoder: the compiled one (ashstream._encoder, when built)
and the reference (ashstream.encode's pyarrow.compute path)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from ashstream import encode, encode_native

# Without a compiler the native module is missing; CI sets ASHSTREAM_REQUIRE_NATIVE=1 so
# that it is never skipped there by accident.
NATIVE = pytest.param(
    "native",
    marks=pytest.mark.skipif(
        not encode_native.available() and os.environ.get("ASHSTREAM_REQUIRE_NATIVE") != "1",
        reason="the compiled encoder is not built here",
    ),
)
ENCODERS = [NATIVE, "reference"]


@contextmanager
def encoder(name: str) -> Iterator[None]:
    """This process encodes with ``name`` inside the block."""
    if name == "native" and not encode_native.available():
        raise RuntimeError("ASHSTREAM_REQUIRE_NATIVE=1 but ashstream._encoder is not built")
    previous = encode._ENCODER
    encode._ENCODER = name
    try:
        yield
    finally:
        encode._ENCODER = previous
