"""Outputs in folders other users share, hostile text from a report or its source, and
what a user template may read: real runs, real files and the real Typst compiler."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import typst

from ashstream.report import load_report
from ashstream.sinks import _TEMP_SUFFIX, TypstModuleSink
from tests.conftest import write_report
from tests.test_cli import command, finished_pid, invoke

NOBODY = 65534
GUESS = "guessed0"  # what mkstemp tries first under the guessable_names fixture
VICTIM_TEXT = "the victim's own file\n"
TEN_ROWS = "SELECT i, 'k' || (i % 3) AS k FROM range(10) t(i)"
TEMPLATE = "#import sys.inputs.data: rows, meta\n#assert.eq(rows.len(), meta.rows_shown)\n= Rows\n"


@pytest.fixture
def guessable_names(monkeypatch):
    """Make every temporary name's random part ``GUESS`` on the first try, as if another
    user had guessed it, so a planted link sits at exactly the name a run tries."""
    real = tempfile._get_candidate_names
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: itertools.chain([GUESS], real()))


def as_nobody(*args: str) -> None:
    """Run a command as user nobody, a real second user."""
    setpriv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    subprocess.run([*setpriv, *args], check=True, capture_output=True, timeout=30)


needs_a_second_user = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="acting as a second user needs root and setpriv",
)


@pytest.fixture
def shared_folder(request):
    """A folder in /tmp that user nobody can write to (tmp_path's parents are private)."""
    folder = Path(tempfile.mkdtemp(prefix="ashstream-shared-"))
    folder.chmod(request.param)
    yield folder
    shutil.rmtree(folder)


def planted_names(pid: int) -> list[str]:
    """Every name a run with ``pid`` writes through, in this version and earlier ones."""
    old = [f".out.typ.{pid}.tmp{s}" for s in ("", ".groups", ".preview")] + [f".out.pdf.{pid}.tmp"]
    return [*old, f".out.typ.{pid}.{GUESS}.tmp", f".out.pdf.{pid}.{GUESS}.tmp"]


def grouped_template_report(folder: Path, **output: object) -> Path:
    """A report with a group (the module's second file) and a user template (its own
    data file), so that a run writes every temporary file there is."""
    (folder / "template.typ").write_text(TEMPLATE)
    spec = {
        "name": "s",
        "source": {"duckdb": {"query": TEN_ROWS}},
        "groups": [{"name": "g", "field": "k"}],
        "output": {"template": "template.typ", **output},
    }
    return write_report(folder, spec)


def run(report: Path, out: Path, *extra: str) -> None:
    result = invoke("run", str(report), "-o", str(out / "out.typ"), "-q", *extra)
    assert result.exit_code == 0, result.stderr


# ------------------------------------------------------------------ planted links


@pytest.mark.process
@pytest.mark.parametrize("template_rows", ["preview", "all"])
def test_a_run_writes_through_no_link_planted_at_a_name_it_uses(
    tmp_path, guessable_names, template_rows
):
    victim = tmp_path / "victim.txt"
    victim.write_text(VICTIM_TEXT)
    out = tmp_path / "out"
    out.mkdir()
    links = planted_names(os.getpid()) + planted_names(finished_pid())
    for name in links:
        (out / name).symlink_to(victim)
    report = grouped_template_report(tmp_path, template_rows=template_rows)
    run(report, out, "--pdf", str(out / "out.pdf"))
    assert victim.read_text() == VICTIM_TEXT
    assert sorted(p.name for p in out.iterdir()) == sorted([*links, "out.pdf", "out.typ"])
    assert all((out / name).is_symlink() for name in links)  # a link is never ours to remove


@pytest.mark.process
def test_a_link_at_the_target_is_replaced_not_written_through(tmp_path):
    victim, pdf_victim = tmp_path / "victim.txt", tmp_path / "victim.pdf"
    victim.write_text(VICTIM_TEXT)
    pdf_victim.write_text(VICTIM_TEXT)
    out = tmp_path / "out"
    out.mkdir()
    (out / "out.typ").symlink_to(victim)
    (out / "out.pdf").symlink_to(pdf_victim)
    report = write_report(tmp_path, {"name": "s", "source": {"duckdb": {"query": TEN_ROWS}}})
    run(report, out, "--pdf", str(out / "out.pdf"))
    assert victim.read_text() == VICTIM_TEXT and pdf_victim.read_text() == VICTIM_TEXT
    assert not (out / "out.typ").is_symlink() and not (out / "out.pdf").is_symlink()
    assert (out / "out.typ").read_text().count(",\n") >= 10
    assert (out / "out.pdf").read_bytes().startswith(b"%PDF")


@pytest.mark.process
@pytest.mark.timeout(60)
def test_a_fifo_at_the_target_neither_blocks_the_run_nor_is_written_through(tmp_path):
    """The run drops the cached pages of the file it will replace: it opens what is at
    the target without blocking (a FIFO) and replaces it, never writing into it."""
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "out.typ")
    report = write_report(tmp_path, {"name": "s", "source": {"duckdb": {"query": TEN_ROWS}}})
    run(report, out)
    assert (out / "out.typ").is_file() and (out / "out.typ").read_text().count(",\n") >= 10


@pytest.mark.process
@needs_a_second_user
@pytest.mark.parametrize(
    "shared_folder", [0o1777, 0o777], ids=["sticky folder", "open folder"], indirect=True
)
def test_links_another_user_plants_in_a_shared_folder_are_not_followed(
    tmp_path, shared_folder, guessable_names
):
    """User nobody plants links at every name the run could use, and a regular file with
    the name of a killed run's temporary file, which is not ours to remove either."""
    victim = tmp_path / "victim.txt"
    victim.write_text(VICTIM_TEXT)
    links = [*planted_names(os.getpid()), "out.typ", "out.pdf"]
    for name in links:
        as_nobody("ln", "-s", str(victim), str(shared_folder / name))
    theirs = f".out.typ.{finished_pid()}.abcdefgh.tmp"
    as_nobody("touch", str(shared_folder / theirs))
    report = grouped_template_report(tmp_path)
    run(report, shared_folder, "--pdf", str(shared_folder / "out.pdf"))
    assert victim.read_text() == VICTIM_TEXT
    assert (shared_folder / theirs).stat().st_uid == NOBODY
    for name in ("out.typ", "out.pdf"):
        target = shared_folder / name
        assert not target.is_symlink() and target.stat().st_uid == os.geteuid()
    assert (shared_folder / "out.pdf").read_bytes().startswith(b"%PDF")


# ------------------------------------------------------------- temporary names


def test_a_temporary_name_is_new_each_time_and_recognised_as_ours(tmp_path):
    report = load_report(
        write_report(tmp_path, {"name": "s", "source": {"duckdb": {"query": "SELECT 1"}}})
    )
    sinks = [TypstModuleSink(tmp_path / "out" / "out.typ", report) for _ in range(2)]
    for sink in sinks:
        sink.open()
    names = [sink.written_path.name for sink in sinks]
    try:
        assert names[0] != names[1]
        for name in names:
            assert name.startswith(f".out.typ.{os.getpid()}.")
            assert _TEMP_SUFFIX.fullmatch(name.removeprefix(".out.typ."))["pid"] == str(os.getpid())
    finally:
        for sink in sinks:
            sink.abort()
    assert list((tmp_path / "out").iterdir()) == []  # the groups' file had no name


@pytest.mark.process
def test_a_run_removes_only_regular_files_of_its_own_that_a_killed_run_left(tmp_path):
    dead, alive = finished_pid(), os.getppid()
    victim = tmp_path / "victim.txt"
    victim.write_text(VICTIM_TEXT)
    out = tmp_path / "out"
    out.mkdir()
    left = [f".out.typ.{dead}.a1b2c3d_.tmp", f".out.pdf.{dead}.zzzzzzzz.tmp"]
    kept = [
        f".out.typ.{alive}.a1b2c3d_.tmp",  # a live run's
        f".out.typ.{dead}.a1b2c3d.tmp",  # not a name mkstemp makes
        f".out.typ.{dead}.a1b2c3d_.tmp.bak",
        f".out.typ.{dead}.A1B2C3D_.tmp",
    ]
    for name in left + kept:
        (out / name).write_text("stale")
    link = f".out.typ.{dead}.linkname.tmp"
    (out / link).symlink_to(victim)
    report = write_report(tmp_path, {"name": "s", "source": {"duckdb": {"query": TEN_ROWS}}})
    run(report, out, "--pdf", str(out / "out.pdf"))
    assert sorted(p.name for p in out.iterdir()) == sorted([*kept, link, "out.pdf", "out.typ"])
    assert victim.read_text() == VICTIM_TEXT


@pytest.mark.process
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_outputs_get_the_mode_a_plain_open_gives(tmp_path, umask):
    report = write_report(tmp_path, {"name": "s", "source": {"duckdb": {"query": TEN_ROWS}}})
    out = tmp_path / "out"
    args = ["run", str(report), "-o", str(out / "out.typ"), "--pdf", str(out / "out.pdf"), "-q"]
    result = subprocess.run(command(*args), capture_output=True, text=True, umask=umask, timeout=60)
    assert result.returncode == 0, result.stderr
    for name in ("out.typ", "out.pdf"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask


# ------------------------------------------------------------ text that is code


def typst_facts(module: Path) -> dict:
    """What Typst reads in ``module``: its rows' count and keys, groups' keys, the title."""
    main = module.with_name("main.typ")
    main.write_text(
        f'#import "{module.name}": rows, groups, meta\n'
        "#metadata((n: rows.len(), keys: rows.first().keys(), "
        "groups: groups.map(g => g.key), title: meta.title, params: meta.params)) <facts>\n"
    )
    return json.loads(typst.query(str(main), "<facts>", field="value", one=True))


@pytest.mark.process
@pytest.mark.parametrize(
    "newline",
    ["\n", "\r", "\x0b", "\x0c", "\x85", "\u2028", "\u2029"],
    ids=["LF", "CR", "VT", "FF", "NEL", "LS", "PS"],
)
def test_a_report_path_that_is_code_stays_a_comment(tmp_path, newline):
    """Typst ends a ``//`` comment at each of these; the path's ``/*`` would comment out
    the data that follows it."""
    folder = tmp_path / f"x{newline}#let rows = (){newline}" / "*y"
    folder.mkdir(parents=True)
    report = write_report(folder, {"name": "s", "source": {"duckdb": {"query": TEN_ROWS}}})
    run(report, tmp_path)
    module = tmp_path / "out.typ"
    first_line = module.read_bytes().decode().split("\n")[0]
    assert newline not in first_line and "#let rows = ()" in first_line
    assert typst_facts(module)["n"] == 10


@pytest.mark.process
def test_names_and_values_from_the_report_and_its_source_are_data(tmp_path):
    hostile = 'a"\n#let rows = ()\n/*\u2028*/ //'
    column = hostile.replace('"', '""')
    query = f"SELECT i AS \"{column}\", '''' || i % 2 || chr(10) || '/*' AS k FROM range(10) t(i)"
    spec = {
        "name": "s",
        "title": hostile,
        "source": {"duckdb": {"query": query}},
        "params": {"p": {"type": "str", "default": hostile}},
        "fields": [hostile, {"name": hostile + "2", "column": "k"}],
        "groups": [{"name": "g", "field": hostile + "2"}],
        "variables": [{"name": "v", "function": "sum", "field": hostile}],
    }
    run(write_report(tmp_path, spec), tmp_path)
    facts = typst_facts(tmp_path / "out.typ")
    assert facts["n"] == 10
    assert facts["keys"] == [hostile, hostile + "2"]
    assert facts["groups"] == ["'0\n/*", "'1\n/*"]
    assert facts["title"] == hostile and facts["params"] == {"p": hostile}


# --------------------------------------------------------------- template root


def template_report(tmp_path: Path, template: str, **output: object) -> tuple[Path, Path]:
    """A report whose template lies in ``tpl``, beside a secret, writing to ``out``."""
    (tmp_path / "secret.txt").write_text("secret")
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    (tpl / "note.txt").write_text("note")
    (tpl / "logo.svg").write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
        '<rect width="10" height="10"/></svg>'
    )
    (tpl / "template.typ").write_text(template)
    spec = {
        "name": "s",
        "source": {"duckdb": {"query": "SELECT * FROM range(300) t(i)"}},
        "output": {
            "template": "tpl/template.typ",
            "pdf": "out/out.pdf",
            "pdf_max_rows": 20,
            **output,
        },
    }
    return write_report(tmp_path, spec), tmp_path / "out"


@pytest.mark.process
@pytest.mark.parametrize(("template_rows", "rows"), [("preview", 20), ("all", 300)])
def test_a_template_reads_its_own_folder_and_its_data(tmp_path, template_rows, rows):
    template = (
        "#import sys.inputs.data: rows, meta\n"
        f"#assert.eq(rows.len(), {rows})\n"
        '#assert.eq(read("note.txt"), "note")\n'
        '#assert.eq(read("/note.txt"), "note")\n'  # the root is the template's folder
        '#image("logo.svg", width: 1cm)\n'
    )
    report, out = template_report(tmp_path, template, template_rows=template_rows)
    run(report, out)
    assert (out / "out.pdf").read_bytes().startswith(b"%PDF")
    assert sorted(p.name for p in out.iterdir()) == ["out.pdf", "out.typ"]


@pytest.mark.process
@pytest.mark.parametrize(
    "path",
    ["/etc/passwd", "../secret.txt", "/secret.txt", "SECRET"],
    ids=[
        "a system file",
        "the folder above",
        "the folder above, from the root",
        "an absolute path",
    ],
)
def test_a_template_reads_nothing_outside_its_folder(tmp_path, path):
    path = path.replace("SECRET", str(tmp_path / "secret.txt"))
    template = f"#import sys.inputs.data: rows\n#read({json.dumps(path)})\n"
    report, out = template_report(tmp_path, template)
    result = invoke("run", str(report), "-o", str(out / "out.typ"), "-q")
    assert result.exit_code == 1
    assert "Typst could not compile out.pdf" in result.stderr
    assert list(out.iterdir()) == []


@pytest.mark.process
def test_a_template_still_finds_the_users_own_packages(tmp_path, monkeypatch):
    package = tmp_path / "data-home" / "typst" / "packages" / "local" / "mine" / "0.1.0"
    package.mkdir(parents=True)
    (package / "typst.toml").write_text(
        '[package]\nname = "mine"\nversion = "0.1.0"\nentrypoint = "lib.typ"\n'
    )
    (package / "lib.typ").write_text("#let answer = 42\n")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data-home"))
    template = (
        '#import "@local/mine:0.1.0": answer\n#import sys.inputs.data: rows\n'
        "#assert.eq(answer, 42)\n#rows.len()\n"
    )
    report, out = template_report(tmp_path, template)
    run(report, out)
    assert (out / "out.pdf").read_bytes().startswith(b"%PDF")
