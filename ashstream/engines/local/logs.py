"""Children's logging: records travel to the parent over the child's pipe."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from ashstream.engines.local.comms import LogLine


class ForwardingHandler(logging.Handler):
    """Sends each record to the parent as a LogLine; never raises into the caller."""

    def __init__(self, send: Callable[[object], None], role: str) -> None:
        super().__init__()
        self.send = send
        self.role = role

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            self.send(LogLine(record.name, record.levelno, message, self.role, os.getpid()))
        except (EOFError, OSError):
            pass  # the parent is gone or closing: nobody is left to read it
        except Exception:
            self.handleError(record)


def forward_logs(send: Callable[[object], None], role: str, level: int) -> None:
    """In a child process: ashstream's loggers go to the parent, at ``level`` and above."""
    logger = logging.getLogger("ashstream")
    logger.handlers[:] = [ForwardingHandler(send, role)]
    logger.setLevel(level)
    logger.propagate = False
