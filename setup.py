"""The build: pure Python, plus the optional compiled encoder (ashstream._encoder).

Like markupsafe's and PyYAML's speedups, the C extension is built when a compiler is
there and skipped, with a warning, when it is not (or fails): ``pip install .`` always
succeeds and the reference encoder in ashstream/encode.py runs instead. Set
ASHSTREAM_REQUIRE_NATIVE=1 to make a failed build an error (CI and the sanitizer script
do, so that they never test the fallback by accident).
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NATIVE = Extension(
    "ashstream._encoder",
    sources=["ashstream/_native/encoder.c"],
    depends=["ashstream/_native/shortest.h", "ashstream/_native/pow5_tables.h"],
    extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)


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
            self._skip(exc)

    @staticmethod
    def _skip(exc):
        if os.environ.get("ASHSTREAM_REQUIRE_NATIVE") == "1":
            raise exc
        print(
            f"WARNING: the compiled encoder was not built ({exc}); ashstream will use the "
            "pure-Python reference encoder, which is about 4x slower.",
            file=sys.stderr,
        )


setup(ext_modules=[NATIVE], cmdclass={"build_ext": OptionalBuildExt})
