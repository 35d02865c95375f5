"""The ``ashstream`` command line; the only module that prints."""

from __future__ import annotations

import click

from ashstream import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ashstream")
def main() -> None:
    """Stream DuckDB queries and Parquet files into Typst values for reports."""
