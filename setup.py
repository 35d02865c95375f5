"""The build: pure Python, plus two optional C extensions: the compiled encoder
(ashstream._encoder) and the cache's checksum (ashstream._checksum).

Like markupsafe's and PyYAML's speedups, each C extension is built when a compiler is
there and skipped, with a warning, when it is not (or fails): ``pip install .`` always
succeeds and the reference runs instead (the encoder in ashstream/encode.py, zlib.crc32). Set
ASHSTREAM_REQUIRE_NATIVE=1 to make a failed build an error (CI and the sanitizer script
do, so that they never test the fallback by accident).
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

FLAGS = ["-O3", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"]
NATIVE = [
    Extension(
        "ashstream._encoder",
        sources=["ashstream/_native/encoder.c"],
        depends=["ashstream/_native/shortest.h", "ashstream/_native/pow5_tables.h"],
        extra_compile_args=FLAGS,
    ),
    Extension(
        "ashstream._checksum", sources=["ashstream/_native/crc32.c"], extra_compile_args=FLAGS
    ),
]


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler at all (CC=false, none installed)
            self._skip(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._skip(exc, ext.name)

    @staticmethod
    def _skip(exc, name="the C extensions"):
        if os.environ.get("ASHSTREAM_REQUIRE_NATIVE") == "1":
            raise exc
        print(
            f"WARNING: {name} was not built ({exc}); ashstream will use its pure-Python "
            "reference instead (the encoder's is about 4x slower, zlib.crc32 about 4x).",
            file=sys.stderr,
        )


setup(ext_modules=NATIVE, cmdclass={"build_ext": OptionalBuildExt})
