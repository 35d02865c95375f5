"""Evaluate Typst literals with the real compiler and read back normalised values.

The document applies ``norm`` to every literal and exposes the result with
``#metadata(…) <values>``; ``typst.query`` returns it as JSON. ``norm`` turns the types
JSON cannot carry exactly (float specials, decimal, datetime, duration, bytes) into
tagged lists, with ``repr`` for numbers because ``str(-1)`` gives a U+2212 minus.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import typst

NORMALISER = r"""
#let norm(v) = {
  let t = type(v)
  if v == none { ("none",) }
  else if t == bool { ("bool", v) }
  else if t == int { ("int", repr(v)) }
  else if t == float { ("float", repr(v)) }
  else if t == decimal { ("decimal", repr(v)) }
  else if t == str { ("str", v) }
  else if t == bytes { ("bytes", array(v)) }
  else if t == datetime {
    ("datetime", v.year(), v.month(), v.day(), v.hour(), v.minute(), v.second())
  }
  else if t == duration { ("duration", repr(v.seconds())) }
  else if t == array { ("array", v.map(norm)) }
  else if t == dictionary { ("dict", v.pairs().map(((k, x)) => (k, norm(x)))) }
  else { ("other", repr(v)) }
}
"""


def typst_array(literals: Sequence[str]) -> str:
    """One Typst array literal holding ``literals`` (a trailing comma keeps (x,) an array)."""
    if not literals:
        return "()"
    return "(\n" + ",\n".join(literals) + ",\n)"


def evaluate(literals: Sequence[str]) -> list:
    """Compile ``literals`` and return ``norm`` of each value, in order."""
    source = NORMALISER + f"#metadata({typst_array(literals)}.map(norm)) <values>\n"
    return json.loads(typst.query(source.encode(), "<values>", field="value", one=True))


def evaluate_module(module_source: str, expression: str) -> object:
    """Import a data module (as text) and return ``norm`` of ``expression`` over it."""
    source = NORMALISER + module_source + f"\n#metadata(norm({expression})) <values>\n"
    return json.loads(typst.query(source.encode(), "<values>", field="value", one=True))
