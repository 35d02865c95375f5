"""README.rst's examples run and print what README.rst says they print."""

import doctest
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.rst"


def test_readme_examples():
    result = doctest.testfile(str(README), module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 8
    assert result.failed == 0


def test_readme_names_the_test_command_that_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "pip install '.[test]' && pytest" in README.read_text()
    assert "pip install --quiet '.[test]'" in ci and "\npytest\n" in ci
