"""What every engine hands the caller: ``Chunk``s in source order, cut from a batch's
encoded text, and the ``Summary`` once the last one is taken."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ashstream.analysis.aggregate import ClosedGroup, Collector, Summary


@dataclass
class Chunk:
    """A run of consecutive rows, encoded: each row's Typst dictionary and ``,\\n``.

    ``groups`` holds the groups whose end this chunk revealed: each ended on the row
    before one of this chunk's rows (a group's end is known only when the next key is).
    The groups still open at the end come in :attr:`Summary.groups`.
    """

    seq: int
    first_row: int
    num_rows: int
    text: bytes
    groups: list[ClosedGroup] = field(default_factory=list)

    def rows(self) -> list[str]:
        """One Typst dictionary literal per row (literals never hold a raw newline)."""
        return self.text.decode("utf-8").split(",\n")[:-1]


def cut_into_chunks(
    first_row: int,
    first_chunk: int,
    rows: int,
    chunk_ends: tuple[int, ...],
    chunk_size: int,
    read_text: Callable[[int, int], bytes],
    closed: list[ClosedGroup],
) -> list[Chunk]:
    """A batch's chunks: at most ``chunk_size`` rows each, each with the groups whose end
    it revealed. ``read_text(start, end)`` returns bytes of the batch's text."""
    chunks = []
    start = row = 0
    for i, end in enumerate(chunk_ends):
        taken = min(chunk_size, rows - row)
        first = first_row + row
        groups = [g for g in closed if first <= g.last_row + 1 < first + taken]
        chunks.append(Chunk(first_chunk + i, first, taken, read_text(start, end), groups))
        start, row = end, row + taken
    return chunks


def summary_of(collector: Collector | None, final_groups: list[ClosedGroup]) -> Summary:
    """A finished stream's totals, charts and the groups still open at its end."""
    if collector is None:
        return Summary([], {}, {})
    return Summary(final_groups, collector.report_totals(), collector.chart_results())
