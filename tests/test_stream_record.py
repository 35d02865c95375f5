"""The one status record every engine writes, and records of other versions."""

from __future__ import annotations

import dataclasses

from ashstream.stream_record import StreamRecord, completed

KEYS = {f.name for f in dataclasses.fields(StreamRecord)} | {"rows_per_s"}


def test_a_record_as_plain_values():
    record = StreamRecord(
        id="s1",
        report="r",
        status="completed",
        rows=500,
        total_rows=500,
        chunks=1,
        bytes=9000,
        started_at=100.0,
        finished_at=102.0,
        memory_bytes=2**20,
    )
    entry = record.to_dict()
    assert set(entry) == KEYS
    assert entry["rows_per_s"] == 250.0
    assert entry["restarts"] == 0 and entry["skipped"] == [] and entry["error"] is None


def test_a_record_of_an_older_version_is_completed_with_empty_fields():
    """The Ray record of 94a7ed1 had no restarts, chunks, bytes or pids: ashstream
    status read it with a KeyError."""
    old = {
        "id": "ray-1-1",
        "report": "r",
        "status": "running",
        "rows": 10,
        "total_rows": None,
        "rows_per_s": 5.0,
        "memory_bytes": 7,
        "started_at": 1.0,
    }
    entry = completed(old)
    assert set(entry) == KEYS
    assert entry["restarts"] == 0 and entry["chunks"] == 0 and entry["pids"] == {}
    assert {k: entry[k] for k in old} == old  # what it had is kept
    assert completed({})["id"] == "?" and completed({})["rows"] == 0
