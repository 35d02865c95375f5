"""``run_report``, the run a library caller shares with ``ashstream run``: the same
module and summary, its progress steps, and nothing left behind when it stops."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

from ashstream import RunProgress, RunStage, SettingsError, run_report, sinks
from ashstream.cli import main
from tests.conftest import write_report

ROWS = 3000


@pytest.fixture
def report(tmp_path: Path) -> Path:
    """A small Parquet source with a group and a total: runs in this process."""
    query = f"SELECT i, (i % 7)::DECIMAL(6, 2) AS d FROM range({ROWS}) t(i)"
    duckdb.sql(f"COPY ({query}) TO '{tmp_path / 'data.parquet'}' (FORMAT parquet)")
    spec = {
        "name": "small",
        "source": {"parquet": "data.parquet", "sorted": True},
        "groups": [{"name": "block", "expr": "i // 1000"}],
        "variables": [{"name": "total", "function": "sum", "field": "d"}],
    }
    return write_report(tmp_path, spec)


# What changes from one run to the next.
UNSTEADY = ("seconds", "rows_per_s", "peak_memory_bytes", "outputs")


def test_the_same_module_and_summary_as_the_command(report, tmp_path):
    summary = run_report(report, output=tmp_path / "lib.typ", chunk_size=500)
    result = CliRunner().invoke(
        main, ["run", str(report), "-o", str(tmp_path / "cli.typ"), "--chunk-size", "500", "--json"]
    )
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    mine = json.loads(json.dumps(summary.to_dict(), default=str))
    assert list(mine) == list(printed)
    assert {k: v for k, v in mine.items() if k not in UNSTEADY} == {
        k: v for k, v in printed.items() if k not in UNSTEADY
    }
    assert (summary.engine, summary.rows, summary.chunks, summary.groups) == ("inline", ROWS, 6, 3)
    assert summary.typst_path == str(tmp_path / "lib.typ") and summary.pdf_path is None
    assert (tmp_path / "lib.typ").read_bytes() == (tmp_path / "cli.typ").read_bytes()


@pytest.mark.process
@pytest.mark.parametrize(
    ("settings", "engine", "workers"),
    [({}, "inline", 0), ({"workers": 1}, "local", 1)],
    ids=["inline", "local"],
)
def test_progress_steps(report, tmp_path, settings, engine, workers):
    steps: list[RunProgress] = []
    typst, pdf = tmp_path / "r.typ", tmp_path / "r.pdf"
    run_report(report, output=typst, pdf=pdf, chunk_size=1000, progress=steps.append, **settings)
    stages = [step.stage for step in steps]
    assert stages == [
        RunStage.STARTED,
        *[RunStage.CHUNK_WRITTEN] * 3,
        RunStage.STREAM_ENDED,
        RunStage.COMPILING_PDF,
        RunStage.OUTPUT_WRITTEN,
        RunStage.OUTPUT_WRITTEN,
    ]
    chunks = [step for step in steps if step.stage is RunStage.CHUNK_WRITTEN]
    assert [step.rows for step in chunks] == [1000, 2000, 3000]
    assert {(step.engine, step.workers, step.total_rows) for step in chunks} == {
        (engine, workers, ROWS)
    }
    local = engine == "local"
    assert all((step.memory_bytes is not None) == local for step in chunks)
    assert all((step.busy_workers is not None) == local for step in chunks)
    assert [step.path for step in steps[-2:]] == [str(pdf), str(typst)]  # the module last
    assert typst.is_file() and pdf.read_bytes().startswith(b"%PDF")


@pytest.mark.parametrize("stage", [RunStage.CHUNK_WRITTEN, RunStage.STREAM_ENDED])
def test_an_interrupt_leaves_no_output(report, tmp_path, stage):
    """Ctrl-C as a chunk is written, or once the stream ended: no module, no temporary
    file, and the KeyboardInterrupt reaches the caller as it is."""

    def interrupt(step: RunProgress) -> None:
        if step.stage is stage:
            raise KeyboardInterrupt

    before = sorted(tmp_path.iterdir())
    with pytest.raises(KeyboardInterrupt):
        run_report(report, output=tmp_path / "r.typ", chunk_size=500, progress=interrupt)
    assert sorted(tmp_path.iterdir()) == before


def _write_back_threads() -> int:
    return sum(t.name == "ashstream-write-behind" for t in threading.enumerate())


def _descriptors_in(folder: Path) -> list[str]:
    """This process's descriptors of files in ``folder`` (those of other tests' objects,
    closed as they are collected, would make a plain count flaky)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own, closed since
            continue
        if target.startswith(f"{folder}/"):
            found.append(target)
    return found


def _starts_write_back_in_rename(folder: Path) -> bool:
    fd = os.open(folder, os.O_RDONLY)
    try:
        return sinks._sync_file_range() is not None and sinks._starts_write_back_in_rename(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("interrupted", [False, True], ids=["committed", "interrupted"])
def test_the_modules_write_back_begins_as_it_grows_and_ends_with_it(
    report, tmp_path, monkeypatch, interrupted
):
    """On ext4, a module that replaces another has its write-back asked for as it grows
    (here every 4 KiB), by a thread with a descriptor of its own: both are gone once
    the module is in place, or removed after an interrupt (the old module stays), and
    the module is what a run writes without it."""
    if not _starts_write_back_in_rename(tmp_path):
        pytest.skip("the temporary folder is not on ext4")
    plain = run_report(report, output=tmp_path / "plain.typ", chunk_size=500)
    module = tmp_path / "behind.typ"
    module.write_bytes(b"// an earlier module\n")
    monkeypatch.setattr(sinks, "WRITE_BEHIND_BYTES", 4096)
    seen = []

    def watch(step: RunProgress) -> None:
        if step.stage is RunStage.CHUNK_WRITTEN:
            seen.append(_write_back_threads())
        elif step.stage is RunStage.STREAM_ENDED and interrupted:
            raise KeyboardInterrupt

    descriptors = _descriptors_in(tmp_path)
    if interrupted:
        with pytest.raises(KeyboardInterrupt):
            run_report(report, output=module, chunk_size=500, progress=watch)
        assert module.read_bytes() == b"// an earlier module\n"
    else:
        run_report(report, output=module, chunk_size=500, progress=watch)
        assert module.read_bytes() == Path(plain.typst_path).read_bytes()
        assert module.stat().st_size > 20 * 4096  # asked for in many steps
    assert seen and set(seen) == {1}
    for thread in threading.enumerate():  # an abandoned one ends on its own, at once
        if thread.name == "ashstream-write-behind":
            thread.join(10)
    assert _write_back_threads() == 0
    assert _descriptors_in(tmp_path) == descriptors
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no tmpfs at /dev/shm")
def test_no_write_back_is_asked_for_where_the_rename_would_not_start_it(report, monkeypatch):
    """tmpfs (as XFS) starts no write-back in the rename: a run that replaces a module
    there asks for none."""
    monkeypatch.setattr(sinks, "WRITE_BEHIND_BYTES", 4096)
    seen = []

    def watch(step: RunProgress) -> None:
        if step.stage is RunStage.CHUNK_WRITTEN:
            seen.append(_write_back_threads())

    folder = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        assert not _starts_write_back_in_rename(folder)
        (folder / "m.typ").write_bytes(b"// an earlier module\n")
        run_report(report, output=folder / "m.typ", chunk_size=500, progress=watch)
    finally:
        shutil.rmtree(folder)
    assert seen and set(seen) == {0}


@pytest.mark.parametrize(
    ("settings", "refused"),
    [
        ({"engine": "spark"}, "engine 'spark' is none of local, ray"),
        ({"engine": "local", "ray_address": "auto"}, "a Ray address needs the Ray engine"),
        ({"engine": "ray", "workers": 2}, "workers: the local engine's, not Ray's"),
        ({"ray_address": "auto", "inline_rows": 0}, "inline_rows: the local engine's"),
        ({"engine": "ray", "profile_dir": "p", "workers": 1}, "workers, profile_dir: the"),
    ],
    ids=["unknown engine", "address on local", "workers", "inline rows", "two at once"],
)
def test_settings_that_do_not_fit_the_engine_are_refused(tmp_path, settings, refused):
    with pytest.raises(SettingsError, match=refused) as raised:
        run_report(tmp_path / "never-read.yaml", output=tmp_path / "r.typ", **settings)
    assert raised.value.exit_code == 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.process
@pytest.mark.timeout(120)
def test_a_pools_module_written_from_its_slots_is_the_inline_runs_byte_for_byte(tmp_path):
    """A plain Parquet source on a pool: its first chunk read by pyarrow, every chunk
    written to the module from its result slot (more batches than slots): the module
    is the one the run in this process writes."""
    from ashstream import load_report
    from ashstream.sources import parquet_head
    from tests.conftest import mixed_sql

    query = f"SELECT * EXCLUDE (pair, info) FROM ({mixed_sql(120_000)})"
    duckdb.sql(f"COPY ({query}) TO '{tmp_path / 'data.parquet'}' (FORMAT parquet)")
    report = write_report(tmp_path, {"name": "plain", "source": {"parquet": "data.parquet"}})
    assert parquet_head(load_report(report), 700) is not None
    modules = []
    for engine, settings in (("inline", {}), ("local", {"workers": 2})):
        out = tmp_path / f"{engine}.typ"
        summary = run_report(report, output=out, chunk_size=700, **settings)
        assert (summary.engine, summary.rows) == (engine, 120_000)
        modules.append(out.read_bytes().replace(out.name.encode(), b""))
    assert modules[0] == modules[1]
