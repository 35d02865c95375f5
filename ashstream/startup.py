"""What a process that ashstream owns does first, so that it starts sooner.

pyarrow imports pandas, when it is installed, the first time it builds any array
(``pa.array``, ``pa.scalar``...), only to ask whether its input is a pandas object.
ashstream never hands it one, and the import costs about 0.18 s: a third of a small
report's whole run. The command line and the pool's children therefore tell pyarrow once
that pandas is absent. In those processes, which run no code of the user's, pyarrow then
takes a pandas object given to ``pa.array`` as a plain sequence (a categorical loses its
dictionary) until something asks for pandas by name (``Table.to_pandas``,
``Table.from_pandas``), which imports it. A library caller's process is left alone: its
pandas objects must still convert as pandas objects.
"""

from __future__ import annotations

import sys
from importlib.abc import MetaPathFinder

import pyarrow as pa


class _NoPandas(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "pandas":
            raise ImportError("ashstream does not need pandas")
        return None


def skip_pandas_probe() -> None:
    """Make pyarrow record "no pandas" without importing it. pyarrow asks again, and
    imports pandas, when something needs pandas for real (``Table.to_pandas``)."""
    if "pandas" in sys.modules:
        return  # already paid for
    finder = _NoPandas()
    sys.meta_path.insert(0, finder)
    try:
        pa.array([])  # a Python sequence: pyarrow probes for pandas, and keeps the answer
    finally:
        sys.meta_path.remove(finder)
