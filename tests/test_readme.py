"""README.rst's examples run and print what README.rst says they print."""

import doctest
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.rst"


@pytest.mark.process
def test_readme_examples(monkeypatch):
    monkeypatch.chdir(README.parent)  # the examples name files relative to the checkout
    result = doctest.testfile(str(README), module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 12
    assert result.failed == 0


def test_readme_names_the_test_command_that_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "pip install -e '.[test]' && pytest" in README.read_text()
    assert "pip install --quiet -e '.[test]'" in ci and "\npytest\n" in ci


def test_readme_is_valid_restructuredtext():
    import docutils.core

    docutils.core.publish_string(
        README.read_text(),
        writer="null",
        settings_overrides={"report_level": 2, "halt_level": 2},  # warnings are errors
    )
