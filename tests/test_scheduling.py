"""The supervisor's decisions and the ordered collector, with plain numbers: no processes."""

from __future__ import annotations

import pytest

from ashstream.chunks import cut_into_chunks
from ashstream.engines.local.collector import ResultOrder
from ashstream.engines.local.comms import BatchReady, TaskDone
from ashstream.engines.local.scheduling import (
    MAX_BATCH_KILLS,
    LostBatch,
    RestartBudget,
    lost_batch_action,
    may_start_reading,
    reading_streams_limit,
    round_robin,
    stream_window,
    suspected,
)
from ashstream.engines.local.supervisor import describe_exit
from ashstream.errors import EncodeError


def test_the_restart_budget_forgets_deaths_older_than_its_window():
    budget = RestartBudget(max_restarts=2, window_s=10.0)
    assert budget.record_death(0.0)
    assert budget.record_death(1.0)
    assert not budget.record_death(2.0)  # a third within 10 s
    assert budget.record_death(12.5)  # the deaths at 0, 1 and 2 are out of the window
    assert budget.in_window == 1
    assert budget.total == 4


@pytest.mark.parametrize(
    ("kills", "policy", "action"),
    [
        (0, "fail", LostBatch.RETRY),
        (MAX_BATCH_KILLS - 1, "fail", LostBatch.RETRY),
        (MAX_BATCH_KILLS, "fail", LostBatch.FAIL),
        (MAX_BATCH_KILLS, "skip", LostBatch.SKIP),
        (MAX_BATCH_KILLS + 5, "skip", LostBatch.SKIP),
    ],
)
def test_what_becomes_of_a_lost_batch(kills, policy, action):
    assert lost_batch_action(kills, policy) is action


def test_only_the_batch_a_transformer_was_running_is_suspected():
    assert suspected(0)
    assert not suspected(1)


def test_round_robin_gives_each_item_its_turn_first():
    assert round_robin(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert round_robin(["a", "b", "c"], 4) == ["b", "c", "a"]
    assert round_robin([], 3) == []


def test_results_are_handed_out_in_seq_order_whatever_order_they_arrive_in():
    order = ResultOrder()
    batches = [BatchReady("s", seq, seq * 10, seq, 10, 0, 100) for seq in range(3)]
    order.put(batches[2], TaskDone("s", 2, 10, 0, 5, (5,)))
    order.put(batches[1], TaskDone("s", 1, 10, 0, 5, (5,)))
    assert not order.next_ready()  # batch 0 is still out
    order.put(batches[0], TaskDone("s", 0, 10, 0, 5, (5,)))
    taken = []
    while order.next_ready():
        taken.append(order.take()[0].seq)
        order.taken()
    assert taken == [0, 1, 2]
    assert not order.finished()
    order.total_batches = 3
    assert order.finished()


def test_a_batch_is_cut_into_chunks_of_at_most_chunk_size_rows():
    text = b"r0,\nr1,\nr2,\nr3,\nr4,\n"
    chunks = cut_into_chunks(100, 20, 5, (8, 16, 20), 2, lambda start, end: text[start:end], [])
    assert [(c.seq, c.first_row, c.num_rows, c.text) for c in chunks] == [
        (20, 100, 2, b"r0,\nr1,\n"),
        (21, 102, 2, b"r2,\nr3,\n"),
        (22, 104, 1, b"r4,\n"),
    ]


def test_exit_codes_are_described_as_an_operator_looks_them_up():
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(1) == "exit code 1"
    assert describe_exit(None) == "exit status unknown"


def test_an_encode_error_counts_rows_from_the_sources_first_row_when_asked():
    error = EncodeError("invalid UTF-8", column="name", row=3)
    assert str(error) == "column 'name', row 3: invalid UTF-8"
    assert error.with_row_offset(65536) == "column 'name', row 65539: invalid UTF-8"
    assert EncodeError("plain").with_row_offset(10) == "plain"


def test_streams_opened_beside_others_share_the_room_down_to_one_batch():
    assert stream_window(transformers=2, open_streams=0) == 4  # alone: 2 + EXTRA_WINDOW
    assert stream_window(transformers=2, open_streams=1) == 2
    assert stream_window(transformers=2, open_streams=19) == 1  # never less than one
    assert stream_window(transformers=8, open_streams=1) == 5


def test_a_queued_stream_starts_below_the_limit_or_when_every_reader_waits_on_its_caller():
    assert reading_streams_limit(transformers=2) == 4
    assert may_start_reading(reading=3, limit=4, all_wait_on_callers=False)
    assert not may_start_reading(reading=4, limit=4, all_wait_on_callers=False)
    assert may_start_reading(reading=4, limit=4, all_wait_on_callers=True)  # else deadlock
    assert may_start_reading(reading=0, limit=1, all_wait_on_callers=True)
