"""The engines that run the batch job: in this process (``inline``), a pool of local
processes over shared memory (``local``), and a Ray cluster (``ray``)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any, Self

from ashstream.chunks import Chunk
from ashstream.report import Report


class Pool:
    """What the pools of the engines share: a context manager that opens and closes
    them, and :meth:`stream`, the chunks of :meth:`start`'s stream."""

    def open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def start(
        self,
        report: Report | str | os.PathLike,
        chunk_size: int | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> Any:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def stream(
        self,
        report: Report | str | os.PathLike,
        chunk_size: int | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> Iterator[Chunk]:
        """The chunks of ``report`` in source order; see :meth:`start`."""
        return iter(self.start(report, chunk_size, params))
