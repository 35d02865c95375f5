#!/usr/bin/env bash
# Runs the C extensions' differential tests (tests/test_native_encoder.py and
# tests/test_encode.py, both encoders; tests/test_checksum.py, the checksum against
# zlib) against a build of ashstream._encoder and ashstream._checksum with gcc's
# AddressSanitizer and UndefinedBehaviorSanitizer; any finding aborts the run.
#
#     bash scripts/sanitize.sh [pytest args]
#
# Needs the test extras installed (pip install '.[test]') and gcc. Works on a copy of the
# working tree in a temporary folder, so the normal build is left alone.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cp -r "$root/ashstream" "$root/tests" "$root/setup.py" "$root/setup.cfg" "$root/README.rst" "$work/"
find "$work/ashstream" -name '*.so' -delete
cd "$work"
# -fno-wrapv: Python builds with -fwrapv, under which signed overflow is defined and
# UBSan would not report it; the C code must not rely on it.
CFLAGS="-O1 -g -fno-omit-frame-pointer -fno-wrapv -fsanitize=address,undefined -fno-sanitize-recover=all" \
LDFLAGS="-fsanitize=address,undefined" \
ASHSTREAM_REQUIRE_NATIVE=1 python setup.py -q build_ext --inplace

# Python itself is not built with ASan: its runtime must be loaded first, and Python's
# deliberate leaks at exit are not findings.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_string_checks=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export ASHSTREAM_REQUIRE_NATIVE=1
python -c "import ashstream._encoder as e, ashstream._checksum as c; print('sanitized builds:', e.__file__, c.__file__)"
# --noconftest: these tests start no processes, and the shared-memory leak check would
# see segments of any other ashstream on the machine.
python -m pytest -q -p no:cacheprovider -o addopts="" --noconftest \
    tests/test_native_encoder.py tests/test_encode.py tests/test_checksum.py "$@"
echo "sanitizers: no finding"
