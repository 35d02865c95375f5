"""The exception hierarchy and the CLI's exit codes; imports nothing else from ashstream."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2  # bad command line or bad report definition
    INTERRUPTED = 130  # 128 + SIGINT
    TERMINATED = 143  # 128 + SIGTERM


class AshstreamError(Exception):
    """Base class of every error ashstream reports to a user."""

    exit_code: int = ExitCode.ERROR


class EncodeError(AshstreamError):
    """A value or column cannot become a Typst value."""


class UnsupportedTypeError(EncodeError, TypeError):
    """A column's Arrow type has no Typst form; the message names the column and the fix."""
