"""The local engine's decisions and its result order, with plain numbers: no processes."""

from __future__ import annotations

import pyarrow as pa
import pytest

from ashstream.chunks import cut_into_chunks
from ashstream.engines.local.children import describe_exit
from ashstream.engines.local.comms import BatchProduced, TaskDone
from ashstream.engines.local.scheduling import (
    CALLER_WAITS_FOR_QUEUED_S,
    MAX_BATCH_KILLS,
    Backlog,
    Breaker,
    DeathAction,
    LostBatch,
    MemoryBreaker,
    RestartBudget,
    admission_pick,
    death_action,
    dispatch_plan,
    least_loaded,
    lost_batch_action,
    may_start_reading,
    reading_streams_limit,
    round_robin,
    stalled,
    stream_window,
    suspected,
    triage,
    waited_on_caller_s,
)
from ashstream.engines.local.streams import ResultOrder
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


R, S, F = LostBatch.RETRY, LostBatch.SKIP, LostBatch.FAIL


@pytest.mark.parametrize(
    ("kills_before", "policy", "fates"),
    [
        pytest.param([], "fail", [], id="held-nothing"),
        pytest.param([0, 0], "fail", [(1, R), (0, R)], id="first-death"),
        pytest.param([2, 0], "fail", [(3, F), (0, R)], id="third-kill-fails"),
        pytest.param([2, 2], "skip", [(3, S), (2, R)], id="third-kill-skips"),
        pytest.param([0, 2], "fail", [(1, R), (2, R)], id="queued-batch-not-blamed"),
    ],
)
def test_triage_blames_only_the_running_batch(kills_before, policy, fates):
    assert triage(kills_before, policy) == fates


@pytest.mark.parametrize(
    ("role", "affordable", "closing", "action"),
    [
        ("transformer", True, False, DeathAction(False, False, True, True)),
        ("producer", True, False, DeathAction(False, True, False, True)),
        ("transformer", True, True, DeathAction(False, False, True, False)),
        ("producer", True, True, DeathAction(False, True, False, False)),
        ("transformer", False, False, DeathAction(True, False, False, False)),
        ("producer", False, True, DeathAction(True, False, False, False)),
    ],
)
def test_what_a_death_means(role, affordable, closing, action):
    assert death_action(role, affordable, closing) == action


def test_round_robin_gives_each_item_its_turn_first():
    assert round_robin(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert round_robin(["a", "b", "c"], 4) == ["b", "c", "a"]
    assert round_robin([], 3) == []


@pytest.mark.parametrize(
    ("loads", "backlogs", "turn", "plan", "turn_after"),
    [
        pytest.param([0, 0], [], 0, [], 1, id="nothing-to-do"),
        pytest.param(
            [0, None], [Backlog(0, 5, 5)], 0, [(0, 0, False), (0, 0, False)], 2, id="one-ready"
        ),
        pytest.param(
            [1, 0],
            [Backlog(0, 5, 5)],
            0,
            [(1, 0, False), (1, 0, False), (0, 0, False)],
            3,
            id="least-loaded-first",
        ),
        pytest.param([0], [Backlog(0, 5, 1)], 7, [(0, 0, False)], 9, id="a-result-slot-each"),
        pytest.param([0], [Backlog(1, 5, 0)], 0, [(0, 0, True)], 2, id="retries-need-no-new-slot"),
        pytest.param(
            [0, 0],
            [Backlog(0, 9, 9), Backlog(0, 9, 9)],
            1,
            [(0, 1, False), (0, 0, False), (1, 1, False), (1, 0, False)],
            5,
            id="streams-take-turns",
        ),
        pytest.param([2, 2], [Backlog(3, 9, 9)], 0, [], 0, id="all-full"),
    ],
)
def test_the_dispatch_plan(loads, backlogs, turn, plan, turn_after):
    assert dispatch_plan(loads, backlogs, turn) == (plan, turn_after)


@pytest.mark.parametrize(
    ("limit", "waited", "awaited", "pick"),
    [
        pytest.param(2, [None], None, 0, id="below-the-limit"),
        pytest.param(1, [None], None, None, id="at-the-limit"),
        pytest.param(1, [0.4], None, None, id="reader-waited-too-little"),
        pytest.param(1, [0.6], None, 0, id="reader-waits-on-its-caller"),
        pytest.param(2, [0.6, None], 1, None, id="one-reader-still-busy"),
        pytest.param(1, [0.06], 2, 2, id="awaited-goes-first-sooner"),
        pytest.param(1, [0.04], 2, None, id="awaited-after-a-twentieth"),
        pytest.param(3, [None], 2, 0, id="below-the-limit-in-order"),
    ],
)
def test_which_queued_stream_may_start_reading(limit, waited, awaited, pick):
    assert admission_pick(limit, waited, awaited, caller_wait_s=0.5) == pick
    assert CALLER_WAITS_FOR_QUEUED_S == 0.05


def test_a_stream_waits_on_its_caller_only_with_every_result_slot_full():
    assert waited_on_caller_s(free_results=0, in_flight=0, retry=0, idle_s=3.0) == 3.0
    assert waited_on_caller_s(free_results=1, in_flight=0, retry=0, idle_s=3.0) is None
    assert waited_on_caller_s(free_results=0, in_flight=1, retry=0, idle_s=3.0) is None
    assert waited_on_caller_s(free_results=0, in_flight=0, retry=1, idle_s=3.0) is None


def test_the_producer_with_the_fewest_streams_takes_the_next():
    assert least_loaded([2, 1, 1]) == 1
    assert least_loaded([0]) == 0


@pytest.mark.parametrize(
    ("started", "caller_can_take", "idle_s", "is_stalled"),
    [
        (True, False, 11.0, True),
        (True, False, 9.0, False),
        (False, False, 11.0, False),  # queued: it waits its turn
        (True, True, 11.0, False),  # the caller has chunks, a batch or the end to take
    ],
)
def test_the_stall_predicate(started, caller_can_take, idle_s, is_stalled):
    assert stalled(started, caller_can_take, idle_s, timeout_s=10.0) is is_stalled


MIB = 2**20


@pytest.mark.parametrize(
    ("steps", "actions"),
    [
        pytest.param(
            [(50, 0.0), (85, 1.0), (90, 2.0), (70, 3.0), (85, 4.0)],
            [[], [Breaker.WARN], [], [], [Breaker.WARN]],
            id="warns-once-per-crossing",
        ),
        pytest.param(
            [(96, 0.0), (90, 1.0), (85, 2.0), (79, 3.0)],
            [[Breaker.WARN, Breaker.PAUSE], [], [], [Breaker.RESUME]],
            id="resumes-only-below-the-warning-level",
        ),
        pytest.param(
            [(96, 0.0), (97, 5.0), (97, 10.5), (97, 11.0)],
            [[Breaker.WARN, Breaker.PAUSE], [], [Breaker.GIVE_UP, Breaker.RESUME], [Breaker.PAUSE]],
            id="gives-up-after-the-pause-timeout",
        ),
        pytest.param(
            [(96, 0.0), (90, 20.0)],
            [[Breaker.WARN, Breaker.PAUSE], []],
            id="no-give-up-between-the-levels",
        ),
    ],
)
def test_the_memory_breaker(steps, actions):
    breaker = MemoryBreaker(pause_timeout_s=10.0)
    assert [breaker.step(used * MIB, 100 * MIB, now) for used, now in steps] == actions


def test_results_are_handed_out_in_seq_order_whatever_order_they_arrive_in():
    order = ResultOrder()
    batches = [BatchProduced("s", seq, seq * 10, seq, 10, 0, 100) for seq in range(3)]
    order.put(batches[2], 5, TaskDone("s", 2, 10, 5, 5, (5,)))
    order.put(batches[1], 4, None)  # left out
    assert not order.has_next()  # batch 0 is still out
    order.put(batches[0], 3, TaskDone("s", 0, 10, 3, 5, (5,)))
    taken = []
    while order.has_next():
        batch, slot, result = order.take()
        taken.append((batch.seq, slot, result is None))
        order.taken()
    assert taken == [(0, 3, False), (1, 4, True), (2, 5, False)]
    assert not order.finished()
    order.total_batches = 3
    assert order.finished()


def test_a_batch_is_cut_into_chunks_of_at_most_chunk_size_rows():
    text = pa.py_buffer(b"r0,\nr1,\nr2,\nr3,\nr4,\n")
    chunks = cut_into_chunks(100, 20, 5, (8, 16, 20), 2, text, [])
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
