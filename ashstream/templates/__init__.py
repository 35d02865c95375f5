"""The built-in Typst templates, kept as package data."""

from importlib import resources


def default_template() -> bytes:
    """The default report: title, parameters, row count and a table of the rows."""
    return resources.files(__package__).joinpath("default.typ").read_bytes()
