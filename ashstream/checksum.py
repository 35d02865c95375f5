"""CRC-32 as zlib computes it, fast: the cache's texts are checksummed when written and
checked before they are reused, so a run checksums as many bytes as it writes.

``crc32`` is ``zlib.crc32``'s value, from the C extension ``ashstream._checksum``
(carry-less multiplication, ~4x zlib's table) where it is built and the CPU has the
instructions, else from zlib itself, the reference the tests compare it with.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

try:
    from ashstream import _checksum
except ImportError:  # built without a C compiler
    _checksum = None

_FAST = _checksum is not None and _checksum.available()
crc32: Callable[..., int] = _checksum.crc32 if _FAST else zlib.crc32  # (data, value=0)


def native() -> bool:
    """Whether :func:`crc32` is the C extension's."""
    return _FAST


def _multiply_mod_p(a: int, b: int) -> int:
    """a·b modulo CRC-32's polynomial (bits reflected, as zlib's ``multmodp``)."""
    product, bit = 0, 1 << 31
    while a:
        if a & bit:
            product ^= b
            a ^= bit
        bit >>= 1
        b = (b >> 1) ^ 0xEDB88320 if b & 1 else b >> 1
    return product


def _powers_of_x() -> list[int]:
    """x^(2^k) modulo the polynomial, k = 0..63 (zlib's ``x2n_table``, longer)."""
    powers = [1 << 30]  # x^1
    for _ in range(63):
        powers.append(_multiply_mod_p(powers[-1], powers[-1]))
    return powers


_X2N = _powers_of_x()


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC-32 of two texts one after the other, from theirs and the second's length
    (zlib's ``crc32_combine``, which Python's zlib does not offer): each batch's text is
    checksummed by the transformer that wrote it, where it is still in the CPU's cache."""
    shift, k = 1 << 31, 3  # x^0; the length in bits: 2^3 per byte
    while length2:
        if length2 & 1:
            shift = _multiply_mod_p(_X2N[k], shift)
        length2 >>= 1
        k += 1
    return _multiply_mod_p(shift, crc1) ^ crc2
