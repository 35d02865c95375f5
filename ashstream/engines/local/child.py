"""What every child process does first: its name in ``ps``, its signals, a watch on the parent.

A child must never outlive the process that owns the pool, however that process ends.
``prctl(PR_SET_PDEATHSIG)`` cannot do it here: a forkserver child's parent is the fork
server, not the pool. Instead the pool owns the only write end of a *lifeline* pipe and
every child (transformers, producers, the registry's Manager) holds a read end: when the
pool's process dies, however it dies, the kernel closes the write end and each child's
watch thread reads EOF, cleans up after the pool and exits at once, silently. The
segments are then gone before the resource tracker looks for them, so it has nothing to
warn about either. (The write end also closes when the pool closes; a child still alive
then just exits. A plain ``os.fork`` of the pool's process by user code would copy the
write end and delay the children's exit until the fork exits too.)
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

import setproctitle

from ashstream.engines.local.logs import forward_logs
from ashstream.engines.local.shm import unlink_segments_of
from ashstream.profiling import tracked
from ashstream.sources import remove_spill_dirs_of
from ashstream.startup import skip_pandas_probe

# Test seams, read from the *parent's* environment when it starts a child and passed in
# the child's parameters: a forkserver child's environment is the fork server's, fixed
# when the first process of the interpreter started, so the child could not see a
# variable set later.
# "ROW" or "ROW:N": a transformer given this row SIGKILLs itself, in its slot's first N
# starts (every start when N is left out).
CRASH_AT_ROW_ENV = "ASHSTREAM_TEST_CRASH_AT_ROW"
FAIL_AT_ROW_ENV = "ASHSTREAM_TEST_FAIL_AT_ROW"  # ... raises an unexpected exception instead
# "ROLE" or "ROLE:N": a child of that role SIGKILLs itself before it is ready, in its
# slot's first N starts (every start when N is left out).
CRASH_AT_START_ENV = "ASHSTREAM_TEST_CRASH_AT_START"


def _in_first_starts(starts: str, generation: int) -> bool:
    return not starts or generation < int(starts)


@dataclass(frozen=True)
class Faults:
    """Faults a test asked this child to simulate, as an out-of-memory kill would."""

    crash_at_row: int = -1
    fail_at_row: int = -1
    crash_at_start: bool = False

    @classmethod
    def from_environment(cls, role: str, generation: int) -> Faults:
        def row(variable: str) -> int:
            value, _, starts = os.environ.get(variable, "-1").partition(":")
            wanted = role == "transformer" and _in_first_starts(starts, generation)
            return int(value) if wanted else -1

        target, _, starts = os.environ.get(CRASH_AT_START_ENV, "").partition(":")
        at_start = target == role and _in_first_starts(starts, generation)
        return cls(row(CRASH_AT_ROW_ENV), row(FAIL_AT_ROW_ENV), at_start)


@dataclass(frozen=True)
class ChildParams:
    """Everything a transformer or producer process is started with (picklable)."""

    role: str  # "transformer" or "producer"
    index: int  # its slot, 0..N-1, kept across restarts
    generation: int  # restarts of this slot, for naming profiles
    pool_id: str  # "<pid of the pool's process>_<tag>": names its segments (shm.new_pool_id)
    lifeline: Connection  # read end of the pool's lifeline pipe: EOF when the pool died
    profile_dir: str | None  # record allocations with memray into this folder
    log_level: int  # the level the parent's ashstream logger shows
    faults: Faults = Faults()


def process_title(role: str, index: int | None, pool_pid: int) -> str:
    """``ashstream: transformer 1 [pool 4242]``: what ``ps`` and ``top`` show."""
    who = role if index is None else f"{role} {index}"
    return f"ashstream: {who} [pool {pool_pid}]"


def become_child(
    role: str, index: int | None, pool_id: str, lifeline: Connection
) -> threading.Thread:
    """First thing in a child: name it, leave Ctrl-C to the parent, watch the parent.

    Returns the watch thread (see :func:`run_child`)."""
    setproctitle.setproctitle(process_title(role, index, int(pool_id.split("_")[0])))
    # Ctrl-C reaches the whole process group; only the parent decides what it means.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return watch_parent(lifeline, pool_id)


def watch_parent(lifeline: Connection, pool_id: str) -> threading.Thread:
    """A daemon thread that ends this process as soon as the pool's process is gone."""

    def watch() -> None:
        try:
            lifeline.recv_bytes()  # the pool never writes: this returns only at EOF
        except (EOFError, OSError):
            pass
        try:
            unlink_segments_of(pool_id)  # none are left if the pool closed normally
            remove_spill_dirs_of(os.getpid())  # a producer's DuckDB spill, if any
        finally:
            os._exit(0)  # no clean-up of our own is owed to a dead parent, nor a traceback

    thread = threading.Thread(target=watch, name="ashstream-watch-parent", daemon=True)
    thread.start()
    return thread


def run_child(
    params: ChildParams,
    send: Callable[[object], None],
    serve: Callable[[], None],
) -> None:
    """The life of a transformer or producer process around its ``serve`` loop: named,
    watching the parent, logging through the parent, profiled when asked."""
    name = f"{params.role}{params.index}"
    watcher = become_child(params.role, params.index, params.pool_id, params.lifeline)
    skip_pandas_probe()
    forward_logs(send, name, params.log_level)
    if params.faults.crash_at_start:
        os.kill(os.getpid(), signal.SIGKILL)
    with tracked(params.profile_dir, name, params.generation):
        try:
            serve()
        except (EOFError, OSError):
            # The pipe to the parent broke. If the parent died, the watch thread ends
            # this process (after cleaning up); if it lives on, return.
            watcher.join(1.0)
