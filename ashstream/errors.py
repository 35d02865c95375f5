"""The exception hierarchy and the CLI's exit codes; imports nothing else from ashstream."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2  # bad command line or bad report definition
    INTERRUPTED = 130  # 128 + SIGINT
    TERMINATED = 143  # 128 + SIGTERM


# Said after an error that is ashstream's fault, not the user's.
INTERNAL_ERROR_ADVICE = (
    "This is probably a bug in ashstream: please report it, with the trace that "
    "`ashstream run --log-level debug` shows"
)


class AshstreamError(Exception):
    """Base class of every error ashstream reports to a user."""

    exit_code: int = ExitCode.ERROR

    def with_row_offset(self, first_row: int) -> str:
        """The message, with rows counted from the source's first row rather than from
        the first row of the batch the error was found in (see :class:`EncodeError`)."""
        return str(self)


class EncodeError(AshstreamError):
    """A value or column cannot become a Typst value; ``row`` counts from the first row
    of the array or batch that was being encoded."""

    def __init__(self, message: str, *, column: str | None = None, row: int | None = None):
        self.detail = message
        self.column = column
        self.row = row
        super().__init__(self._describe(row))

    def _describe(self, row: int | None) -> str:
        where = [f"column {self.column!r}"] if self.column is not None else []
        where += [f"row {row}"] if row is not None else []
        return ", ".join(where) + ": " + self.detail if where else self.detail

    def with_row_offset(self, first_row: int) -> str:
        return self._describe(None if self.row is None else first_row + self.row)


class UnsupportedTypeError(EncodeError, TypeError):
    """A column's Arrow type has no Typst form; the message names the column and the fix."""


class ReportError(AshstreamError):
    """The report definition (YAML, parameters, fields) is wrong; names file and key."""

    exit_code = ExitCode.USAGE


class SettingsError(AshstreamError):
    """Settings that cannot work together (an output that is also an input, a chunk
    size past what fits): found before anything runs."""

    exit_code = ExitCode.USAGE


class SourceError(AshstreamError):
    """The source cannot be opened or read."""


class SinkError(AshstreamError):
    """An output file could not be written, or Typst could not compile the PDF."""


class StatusError(AshstreamError):
    """``ashstream status`` cannot trust or read this user's status directory."""


class ResourceError(AshstreamError):
    """Too little shared memory or disk, found before the run starts."""


class PipelineError(AshstreamError):
    """The pipeline cannot go on: a stall, a pool that cannot start or was misused, or an
    internal failure (whose message then says it is most likely a bug)."""


class WorkerCrashed(PipelineError):
    """A process doing the work died past its retries: a transformer or producer of
    the local engine, or a Ray worker; the message says which and what is known."""


class Cancelled(AshstreamError):
    """The stream was cancelled: by the caller, Ctrl-C (exit 130) or SIGTERM (exit 143)."""

    exit_code = ExitCode.INTERRUPTED

    def __init__(self, message: str = "cancelled", exit_code: int = ExitCode.INTERRUPTED):
        super().__init__(message)
        self.exit_code = exit_code
