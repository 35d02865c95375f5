"""Refuses to open a StreamPool from the unguarded top level of the main script.

With the forkserver and spawn start methods every child process re-runs the main script,
under the name ``__mp_main__`` (CPython's multiprocessing/spawn.py, ``_fixup_main_from_path``
and ``_fixup_main_from_name``; a forkserver's children do the same). A script that opens a
pool outside ``if __name__ == "__main__":`` thus opens one again in each child, and the parent
sees a cascade of EOFError tracebacks. ``check_main_guard`` turns that into one clear error.
"""

from __future__ import annotations

import ast
import multiprocessing
import os
import sys
from collections.abc import Callable
from types import FrameType

from ashstream.errors import PipelineError

_FIX = 'without `if __name__ == "__main__":`; worker processes re-import the main script, so move the code that opens the pool under that guard.'


def check_main_guard() -> None:
    """Raises PipelineError when the caller runs at the unguarded top level of the main script.

    In the parent (before any process starts): parses the main script and checks the line of
    its ``<module>`` frame. In a child (the safety net): raises while the child is importing
    the main script. Returns silently whenever it cannot tell (no script file, REPL, Jupyter).
    """
    # spawn.py and forkserver.py set _inheriting while a child imports the main script; CPython
    # itself refuses to start processes then (spawn.py, _check_not_importing_main).
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        frame = _module_frame(lambda f: f.f_globals.get("__name__") == "__mp_main__")
        where = (
            f"{frame.f_code.co_filename} (line {frame.f_lineno})" if frame else "the main script"
        )
        raise PipelineError(
            f"StreamPool was opened while a worker process imported {where}, {_FIX}"
        )
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    name = getattr(getattr(main, "__spec__", None), "name", None) or ""
    # Children never re-run a package's __main__.py nor an "ipython" script (spawn.py again).
    if not path or name == "__main__" or name.endswith(".__main__") or _is_ipython(path):
        return
    # The frame running the script's own code: not code exec'd from a string in its globals.
    frame = _module_frame(lambda f: f.f_globals is main.__dict__ and _same(f, path))
    if frame is None:
        return  # called from a REPL or notebook, or from outside the main module's code
    try:  # when in doubt, do not raise
        with open(path, "rb") as file:
            guarded = line_is_guarded(file.read(), frame.f_lineno)
    except (OSError, SyntaxError, ValueError):
        return
    if not guarded:
        raise PipelineError(
            f"StreamPool was opened at the top level of {path} (line {frame.f_lineno}) {_FIX}"
        )


def check_children_can_start() -> None:
    """Raises PipelineError where a pool's children would fail as they start: opened
    from the unguarded top level of the main script (:func:`check_main_guard`), or a
    main script that is no file for them to re-import."""
    check_main_guard()
    main_file = getattr(sys.modules["__main__"], "__file__", None)
    if main_file is not None and not os.path.exists(main_file):
        raise PipelineError(
            f"cannot start worker processes: the main script {main_file!r} is not a "
            "file (code read from stdin?). Save it to a file and run that."
        )


def line_is_guarded(source: str | bytes, lineno: int) -> bool:
    """Whether line ``lineno`` of ``source`` lies in an ``if`` testing ``__name__`` or in a body
    of a function or class; raises SyntaxError or ValueError when ``source`` does not parse."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.If | ast.IfExp) and _mentions_name(node.test):
            first = node.lineno  # the test line too: `if __name__ == "__main__": main()`
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            first = node.body[0].lineno  # not the decorators, defaults and bases
        else:
            continue
        if first <= lineno <= (node.end_lineno or node.lineno):
            return True
    return False


def _is_ipython(path: str) -> bool:
    return os.path.splitext(os.path.basename(path))[0] == "ipython"


def _mentions_name(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Name) and n.id == "__name__" for n in ast.walk(node))


def _module_frame(matches: Callable[[FrameType], bool]) -> FrameType | None:
    """The innermost frame running module-level code that satisfies ``matches``."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>" and matches(frame):
            return frame
        frame = frame.f_back
    return None


def _same(frame: FrameType, path: str) -> bool:
    try:
        return os.path.samefile(frame.f_code.co_filename, path)
    except (OSError, ValueError):
        return False
