"""The ``ashstream`` command: its skeleton, run as a real subprocess."""

import subprocess
import sys

import ashstream


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ashstream", *args], capture_output=True, text=True, timeout=60
    )


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"ashstream, version {ashstream.__version__}"


def test_help():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "Typst values" in result.stdout


def test_unknown_command_is_a_usage_error():
    result = run_cli("frobnicate")
    assert result.returncode == 2
    assert "No such command 'frobnicate'" in result.stderr
