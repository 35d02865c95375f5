"""Hostile input and other local users (issue 21): a planted status directory or
socket, and reports that try to do more than read their sources.

Where a second user matters, the attacker's side runs as ``nobody`` (``setpriv``), as
CI runs as root; elsewhere those tests are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.conftest import assert_one_line

NOBODY = 65534


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ashstream", *args]


def _nobody_can_run_python() -> str | None:
    """Why a test cannot run code as another user here, or None when it can."""
    if os.getuid() != 0:
        return "needs root to run code as another user (setpriv)"
    if shutil.which("setpriv") is None:
        return "needs setpriv (util-linux) to run code as another user"
    probe = subprocess.run(as_nobody(sys.executable, "-c", "pass"), capture_output=True)
    if probe.returncode:
        return f"user nobody cannot run {sys.executable} here"
    return None


def as_nobody(*args: str) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *args]


needs_second_user = pytest.mark.skipif(
    (reason := _nobody_can_run_python()) is not None, reason=reason or ""
)


@pytest.fixture
def shared_dir():
    """A folder every user may write to, sticky like /tmp: where an attacker plants."""
    path = Path(tempfile.mkdtemp(prefix="ashstream-shared-"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- status


def _status(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command("status", *args), env=env, capture_output=True, text=True, timeout=60
    )


@needs_second_user
@pytest.mark.parametrize("plant", ["symlink", "foreign directory"])
def test_status_refuses_a_planted_directory_and_touches_nothing_in_it(tmp_path, shared_dir, plant):
    victim = tmp_path / "victim"  # one of our 0700 folders, holding a .json file
    victim.mkdir(mode=0o700)
    (victim / "precious.json").write_text("{not json, and not ours to delete")
    (victim / "1-deadbeef.json").write_text("{}")  # ashstream's name pattern, dead pid
    planted = shared_dir / f"ashstream-{os.getuid()}"
    if plant == "symlink":
        make = f"import os; os.symlink({str(victim)!r}, {str(planted)!r})"
        expected = "symbolic link"
    else:
        make = f"import os; os.mkdir({str(planted)!r}, 0o700)"
        expected = f"belongs to uid {NOBODY}"
    subprocess.run(as_nobody(sys.executable, "-c", make), check=True)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(shared_dir)}
    for args in ((), ("--json",)):
        result = _status(env, *args)
        assert result.returncode == 1, result
        assert_one_line(result.stderr, "cannot list the runs", str(planted), expected)
    assert sorted(p.name for p in victim.iterdir()) == ["1-deadbeef.json", "precious.json"]


def test_status_refuses_a_directory_others_can_read(tmp_path):
    runtime = tmp_path / f"ashstream-{os.getuid()}"
    runtime.mkdir()
    runtime.chmod(0o755)
    result = _status({**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)})
    assert result.returncode == 1
    assert_one_line(result.stderr, "mode 0755", "0700")


def test_a_run_beside_a_planted_status_directory_still_runs_and_says_why_status_cannot_see_it(
    tmp_path,
):
    from tests.conftest import write_report

    runtime = tmp_path / f"ashstream-{os.getuid()}"
    runtime.symlink_to(tmp_path)
    report = write_report(tmp_path, {"name": "r", "source": {"duckdb": {"query": "SELECT 1 AS a"}}})
    result = subprocess.run(
        command("run", str(report), "-o", str(tmp_path / "r.typ"), "--workers", "1", "-q"),
        env={**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "ashstream status" in result.stderr and "symbolic link" in result.stderr
    assert (tmp_path / "r.typ").is_file()


# What another user serves at a registry's address: a Manager's first reply, as a
# pickle that, unpickled, creates a file (it could as well run any code).
_ATTACKER = textwrap.dedent(
    """
    import os, sys
    from multiprocessing.connection import Listener

    class Payload:
        def __reduce__(self):
            return (open, (sys.argv[2], "w"))

    listener = Listener(sys.argv[1], authkey=bytes.fromhex(sys.argv[3]))
    os.chmod(sys.argv[1], 0o777)
    print("ready", flush=True)
    while True:
        try:
            conn = listener.accept()
            conn.recv()
            conn.send(Payload())
        except Exception:
            pass
    """
)


@needs_second_user
@pytest.mark.parametrize("socket_owner", ["attacker", "victim"])
def test_status_never_unpickles_a_reply_from_another_user(shared_dir, monkeypatch, socket_owner):
    from ashstream.engines.local.registry import running_pools
    from ashstream.status_files import runtime_dir_path

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(shared_dir / "runtime"))
    runtime = Path(runtime_dir_path())
    runtime.mkdir(mode=0o700, parents=True)
    address, evidence, key = shared_dir / "listener", shared_dir / "pwned", "ab" * 16
    attacker = subprocess.Popen(
        as_nobody(sys.executable, "-c", _ATTACKER, str(address), str(evidence), key),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert attacker.stdout.readline().strip() == "ready"
        if socket_owner == "victim":  # the file is ours; only the peer's uid tells
            os.chown(address, os.getuid(), os.getgid())
        # The status file is ours (no other user can write in the 0700 directory): this
        # checks the next line of defence, for a file whose address was swapped.
        status = {"pid": attacker.pid, "started_at": 0, "address": str(address), "authkey": key}
        (runtime / f"{attacker.pid}-0badcafe.json").write_text(json.dumps(status))
        [pool] = running_pools()
        assert pool["pid"] == attacker.pid and pool["registry"] == "unreachable"
        assert not evidence.exists()
    finally:
        attacker.kill()
        attacker.communicate(timeout=10)
