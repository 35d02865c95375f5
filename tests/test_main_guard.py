"""check_main_guard: one clear error for a pool opened outside `if __name__ == "__main__":`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pytest

from ashstream.engines.local.main_guard import check_main_guard, line_is_guarded

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = "import sys\nfrom ashstream.engines.local.main_guard import check_main_guard\n"
MARK = "# <- here"


def run_python(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(cwd)])}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=50
    )


def write(path: Path, body: str) -> tuple[Path, int]:
    """Writes IMPORTS + body; returns the file and the number of the line marked MARK."""
    source = IMPORTS + textwrap.dedent(body)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    marked = [n for n, line in enumerate(source.splitlines(), 1) if MARK in line]
    return path, marked[0] if marked else 0


def assert_refused(result: subprocess.CompletedProcess[str], script: Path, line: int) -> None:
    assert result.returncode != 0, result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ashstream.errors.PipelineError: StreamPool was opened"), result.stderr
    assert f"top level of {script} (line {line})" in last
    assert 'if __name__ == "__main__":' in last
    assert result.stderr.count("Traceback (most recent call last)") == 1  # no cascade


UNGUARDED = {
    "top level": f"""
        check_main_guard()  {MARK}
        """,
    "function called at top level": f"""
        def main():
            check_main_guard()

        main()  {MARK}
        """,
    "exec at top level": f"""
        exec("check_main_guard()")  {MARK}
        """,
    "unguarded branch": f"""
        if len(sys.argv) < 5:
            for _ in range(1):
                check_main_guard()  {MARK}
        """,
}

GUARDED = {
    "under the guard": """
        if __name__ == "__main__":
            check_main_guard()
        """,
    "main() under the guard": """
        def main():
            check_main_guard()

        if __name__ == "__main__":
            main()
        """,
    "reversed one-line guard": """
        if "__main__" == __name__: check_main_guard()
        """,
    "exec under the guard": """
        if __name__ in ("__main__",):
            exec("check_main_guard()")
        """,
    "thread started under the guard": """
        import threading

        if __name__ == "__main__":
            thread = threading.Thread(target=check_main_guard)
            thread.start()
            thread.join()
        """,
}


@pytest.mark.process
@pytest.mark.timeout(60)
@pytest.mark.parametrize("body", UNGUARDED.values(), ids=UNGUARDED.keys())
def test_unguarded_script_is_refused_naming_script_and_line(tmp_path, body):
    script, line = write(tmp_path / "job.py", body + "print('reached')\n")
    result = run_python([str(script)], tmp_path)
    assert_refused(result, script, line)
    assert "reached" not in result.stdout


@pytest.mark.process
@pytest.mark.timeout(60)
def test_an_unguarded_cached_run_is_refused_with_the_one_clear_error(tmp_path):
    """A cached run that computes units starts the fork server ahead of its pool
    (children.start_fork_server), and checks the guard first, as the pool does."""
    query = "SELECT range AS i FROM range(100)"
    duckdb.sql(f"COPY ({query}) TO '{tmp_path / 'data.parquet'}' (FORMAT parquet)")
    (tmp_path / "r.yaml").write_text("name: r\nsource: {parquet: data.parquet, sorted: true}\n")
    body = f"""
        from ashstream import run_report

        run_report("r.yaml", cache="cache", workers=1)  {MARK}
        """
    script, line = write(tmp_path / "job.py", body + "print('reached')\n")
    result = run_python([str(script)], tmp_path)
    assert_refused(result, script, line)
    assert "reached" not in result.stdout
    assert not (tmp_path / "r.typ").exists()


@pytest.mark.process
@pytest.mark.timeout(60)
@pytest.mark.parametrize("body", GUARDED.values(), ids=GUARDED.keys())
def test_guarded_script_passes(tmp_path, body):
    script, _ = write(tmp_path / "job.py", body + "print('reached')\n")
    result = run_python([str(script)], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "reached\n"


@pytest.mark.process
@pytest.mark.timeout(60)
def test_no_script_file_passes(tmp_path):
    result = run_python(["-c", IMPORTS + "check_main_guard()\nprint('reached')"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "reached\n"


@pytest.mark.process
@pytest.mark.timeout(60)
def test_run_as_module_follows_what_children_rerun(tmp_path):
    # spawn.py never re-runs a package's __main__.py (`python -m pkg`), but re-runs a plain
    # module run with `python -m mod`: only the latter is refused.
    write(tmp_path / "pkg" / "__init__.py", "")
    write(tmp_path / "pkg" / "__main__.py", "check_main_guard()\nprint('reached')\n")
    result = run_python(["-m", "pkg"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "reached\n"

    module, line = write(tmp_path / "mod.py", f"check_main_guard()  {MARK}\n")
    assert_refused(run_python(["-m", "mod"], tmp_path), module, line)


@pytest.mark.process
@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_child_importing_main_is_refused(tmp_path, method):
    # The safety net: a child that re-imports the main script raises even for code the
    # parent-side check lets pass (here a guard that is true in children only).
    script, line = write(
        tmp_path / "job.py",
        f"""
        import multiprocessing
        from ashstream.errors import PipelineError

        if __name__ == "__mp_main__":
            try:
                check_main_guard()  {MARK}
            except PipelineError as error:
                print("child:", error, file=sys.stderr, flush=True)

        if __name__ == "__main__":
            check_main_guard()
            process = multiprocessing.get_context("{method}").Process(target=int)
            process.start()
            process.join()
            sys.exit(process.exitcode)
        """,
    )
    result = run_python([str(script)], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(
        f"child: StreamPool was opened while a worker process imported {script} (line {line})"
    ), result.stderr
    assert 'if __name__ == "__main__":' in result.stderr


def test_in_process_under_pytest_passes():
    check_main_guard()


LINES = {
    "top level": (f"f()  {MARK}", False),
    "in the guard": (f'if __name__ == "__main__":\n    f()  {MARK}', True),
    "one-line guard": (f'if __name__ == "__main__": f()  {MARK}', True),
    "reversed guard": (f'if "__main__" == __name__:\n    f()  {MARK}', True),
    "guard with in": (f'if __name__ in ("__main__",):\n    f()  {MARK}', True),
    "deep in the guard": (
        f'if __name__ == "__main__":\n    if x:\n        for i in y:\n            f()  {MARK}',
        True,
    ),
    "guard in an if": (f'if x:\n    if __name__ == "__main__":\n        f()  {MARK}', True),
    "guard as elif": (f'if x:\n    pass\nelif __name__ == "__main__":\n    f()  {MARK}', True),
    "after the guard": (f'if __name__ == "__main__":\n    pass\nf()  {MARK}', False),
    "other if": (f"if x:\n    f()  {MARK}\nelse:\n    g()", False),
    "with": (f"with open(p) as file:\n    f()  {MARK}", False),
    "try": (f"try:\n    f()  {MARK}\nexcept E:\n    pass", False),
    "function body": (f"def main():\n    f()  {MARK}", True),
    "class body": (f"class K:\n    x = f()  {MARK}", True),
    "decorator": (f"@f()  {MARK}\ndef main():\n    pass", False),
    "conditional expression": (f'x = f() if __name__ == "__main__" else None  {MARK}', True),
    "multi-line call": (f"f(\n    1,\n    2,  {MARK}\n)", False),
    "multi-line call in the guard": (
        f'if __name__ == "__main__":\n    f(\n        1,  {MARK}\n    )',
        True,
    ),
}


@pytest.mark.parametrize(("source", "guarded"), LINES.values(), ids=LINES.keys())
def test_line_is_guarded(source, guarded):
    line = next(n for n, text in enumerate(source.splitlines(), 1) if MARK in text)
    assert line_is_guarded(source, line) is guarded
    assert line_is_guarded(source.encode(), line) is guarded


def test_line_is_guarded_raises_on_bad_source():
    with pytest.raises(SyntaxError):
        line_is_guarded("if __name__ ==\n", 1)
