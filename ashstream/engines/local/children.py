"""The pool's child processes: start, readiness, replacement and stop; nothing of streams.

Each child has one duplex pipe to the parent. The parent reads it (the dispatcher, or
:meth:`ChildSet.start` until every child is ready) and writes to it only through the
child's :class:`Outbox`. A child's death is told by its own pipe: the child holds the
only other end, so the parent reads EOF however it ends, and its pid tells whether it is
gone. The process sentinel is not used for that: under the forkserver start method it is
a pipe from the fork server, which reads as every child's death (exit code 255) when the
fork server itself is killed although every child lives on. A later start then launches
a new fork server (``ForkServer.ensure_running`` finds the old one gone).

Every child also holds a read end of the *lifeline* pipe (:mod:`.child`), whose only write
end is this process's: the children exit as soon as the pool's process is gone.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess

import psutil

from ashstream import telemetry
from ashstream.engines.local.child import ChildParams, Faults
from ashstream.engines.local.comms import READY, STOP, LogLine
from ashstream.engines.local.main_guard import check_children_can_start
from ashstream.engines.local.producer import run_producer
from ashstream.engines.local.scheduling import RestartBudget, death_action
from ashstream.engines.local.shm import shm_free_text
from ashstream.engines.local.transformer import run_transformer
from ashstream.errors import PipelineError, WorkerCrashed

logger = logging.getLogger(__name__)

TRANSFORMER, PRODUCER = "transformer", "producer"
_ENTRY_POINTS = {TRANSFORMER: run_transformer, PRODUCER: run_producer}
START_TIMEOUT_S = 60.0
JOIN_TIMEOUT_S = 1.0
_CLOSE = object()  # an Outbox's last message: its thread closes the pipe and ends
# What the fork server imports once, so that each child forks with them loaded instead of
# importing pyarrow and ashstream itself. Forking after these imports is safe: the only
# threads they start (numpy's BLAS pool, jemalloc's background thread) are idle and
# fork-aware, and DuckDB starts none until a connection, which the fork server never makes.
FORKSERVER_PRELOAD = (
    "ashstream.engines.local.transformer",
    "ashstream.engines.local.producer",
    "ashstream.engines.local.registry",
)


class Deferred:
    """Telemetry events and children's log lines gathered while a lock is held, and
    emitted once it is released: handlers may call back into the pool."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[tuple[str, dict, dict] | LogLine] = []

    def event(self, name: str, measurements: dict, metadata: dict) -> None:
        with self._lock:
            self._items.append((name, measurements, metadata))

    def log(self, line: LogLine) -> None:
        with self._lock:
            self._items.append(line)

    def flush(self) -> None:
        """Emit what was gathered; call without holding the pool's lock."""
        with self._lock:
            items, self._items = self._items, []
        for item in items:
            if isinstance(item, LogLine):
                logging.getLogger(item.logger).log(
                    item.level, "[%s pid %d] %s", item.role, item.pid, item.message
                )
            else:
                telemetry.emit(*item)


class Outbox:
    """Messages to one child, sent in order by a thread of their own, so that no other
    thread ever blocks on the child's pipe. The thread owns the sending side: it closes
    the connection once it is told to, never while it might still be writing to it."""

    def __init__(self, conn: Connection, name: str, on_error: Callable[[BaseException], None]):
        self._conn = conn
        self._on_error = on_error  # an unexpected failure (not a dead child) breaks the pool
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._feed, name=f"ashstream-send-{name}", daemon=True
        )
        self._thread.start()

    def put(self, message: object) -> None:
        """Never blocks."""
        self._queue.put(message)

    def close(self, timeout_s: float) -> None:
        """Send what is queued, then close the connection; wait up to ``timeout_s`` (0: do
        not wait) for that to happen."""
        self._queue.put(_CLOSE)
        if timeout_s != 0:
            self._thread.join(timeout_s)

    def _feed(self) -> None:
        try:
            while (message := self._queue.get()) is not _CLOSE:
                try:
                    self._conn.send(message)
                except OSError:
                    pass  # the child died: its pipe tells the dispatcher, which replaces it
                except Exception as exc:
                    self._on_error(exc)
        finally:
            self._conn.close()


@dataclass(eq=False)  # a child is itself, whatever its fields say
class Child:
    """A transformer or a producer process, and the parent's ends of its pipe."""

    role: str  # TRANSFORMER or PRODUCER
    index: int  # its slot number 0..N-1, kept across restarts
    process: BaseProcess
    conn: Connection  # read by one thread at a time: ChildSet.start, then the dispatcher
    outbox: Outbox  # everything sent to the child goes through here
    pid: psutil.Process | None  # the process by pid (None: gone before it was looked up)
    starter: psutil.Process | None  # the fork server that started it, if one did
    generation: int = 0  # restarts of this slot, for naming profiles
    ready: bool = False  # it said READY: its imports are done

    def describe(self) -> str:
        return f"{self.role} {self.index} (pid {self.process.pid})"


def describe_exit(code: int | None) -> str:
    """``killed by SIGKILL`` or ``exit code 1``, as an operator would look it up."""
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def death_hint(code: int | None) -> str:
    """What a user can do about a child that died with ``code``. SIGBUS is a write
    to shared memory that /dev/shm had no room for (a tmpfs that filled after the
    arena was made); other deaths are most often the kernel's out-of-memory killer."""
    if code == -signal.SIGBUS:
        return (
            f"a write to shared memory failed: {shm_free_text()}; give it more room "
            "(docker run --shm-size=1g) or use fewer workers"
        )
    return "if the system was out of memory, lower chunk_size or the number of workers"


def receive(conn: Connection) -> object | None:
    """The next message on a child's pipe; None once the child is gone (EOF)."""
    try:
        return conn.recv()
    except (EOFError, OSError):
        return None


class ChildSet:
    """The transformers and producers of one pool, slot by slot.

    Used by one thread at a time: the caller of :meth:`start`, then the dispatcher
    (under its lock), then the caller of :meth:`stop`."""

    def __init__(
        self,
        ctx: BaseContext,
        pool_id: str,
        counts: dict[str, int],
        profile_dir: str | None,
        deferred: Deferred,
        on_error: Callable[[BaseException], None],
    ) -> None:
        self.ctx = ctx
        self.pool_id = pool_id  # names the pool's segments; children clean up by it
        self.counts = counts  # {TRANSFORMER: n, PRODUCER: m}
        self.profile_dir = profile_dir  # memray captures of every child go here
        self.slots: dict[str, list[Child]] = {TRANSFORMER: [], PRODUCER: []}
        self._deferred = deferred  # restart events and log lines, emitted by the caller
        self._on_error = on_error  # an outbox failed unexpectedly: breaks the pool
        # Only this process holds the write end; every child holds a read end and exits
        # when it reads EOF, that is when this process is gone (see .child).
        self.lifeline_r, self._lifeline_w = ctx.Pipe(duplex=False)

    def all(self) -> list[Child]:
        return self.slots[TRANSFORMER] + self.slots[PRODUCER]

    def slot(self, role: str, index: int | None) -> Child | None:
        """The child in slot ``index``, or None (no such slot, or it was left empty)."""
        return next((c for c in self.slots[role] if c.index == index), None)

    def pids(self, role: str) -> list[int]:
        return [c.process.pid for c in self.slots[role]]

    # ---- start

    def start(self, budget: RestartBudget, relay: Callable[[LogLine], None]) -> None:
        """Start every child and wait until each has imported what it needs.

        A child that dies meanwhile (a bad import, the out-of-memory killer) is replaced
        under the restart budget. Log lines go to ``relay``.

        Raises:
            WorkerCrashed: past the restart budget.
            PipelineError: not every child was ready within START_TIMEOUT_S.
        """
        self.preload()
        for role in (TRANSFORMER, PRODUCER):  # one by one: stop() stops those started
            for index in range(self.counts[role]):
                self.slots[role].append(self._start(role, index, 0))
        deadline = time.monotonic() + START_TIMEOUT_S
        while waiting := {c.conn: c for c in self.all() if not c.ready}:
            readable = wait(list(waiting), timeout=max(0.0, deadline - time.monotonic()))
            if not readable:
                names = ", ".join(c.describe() for c in waiting.values())
                raise PipelineError(
                    f"ashstream's processes did not start within {START_TIMEOUT_S:.0f} s "
                    f"({names} not ready); is the machine overloaded?"
                )
            for conn in readable:
                child = waiting[conn]
                message = receive(conn)
                if message == READY:
                    child.ready = True
                elif isinstance(message, LogLine):
                    relay(message)
                elif message is None:
                    self._died_while_starting(child, budget)

    def preload(self) -> None:
        """Have the fork server import what the children need, once: call it before
        this process starts its first process of any kind (the registry's too), as
        that starts the fork server."""
        if self.ctx.get_start_method() == "forkserver":
            _preload_in_forkserver()

    def _died_while_starting(self, child: Child, budget: RestartBudget) -> None:
        code = self.reap(child)
        affordable = budget.record_death(time.monotonic())
        if death_action(child.role, affordable, closing=False).give_up:
            raise WorkerCrashed(
                f"the {child.role} process {child.index} died while the pool was starting "
                f"({describe_exit(code)}); {budget.in_window} child processes died within "
                f"{budget.window_s:.0f} s, so ashstream cannot start. If the system is short "
                "of memory, use fewer workers."
            )
        self.replace(child, code, budget)

    def _start(self, role: str, index: int, generation: int) -> Child:
        """Start a transformer or a producer; ``generation`` counts restarts of its slot."""
        params = ChildParams(
            role,
            index,
            generation,
            self.pool_id,
            self.lifeline_r,
            self.profile_dir,
            logging.getLogger("ashstream").getEffectiveLevel(),  # children log at our level
            Faults.from_environment(role, generation),
        )
        parent_end, child_end = self.ctx.Pipe()
        process = self.ctx.Process(
            target=_ENTRY_POINTS[role],
            args=(params, child_end),
            name=f"ashstream-{role}-{index}",
            daemon=True,
        )
        try:
            process.start()
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        outbox = Outbox(parent_end, f"{role}-{index}", self._on_error)
        return Child(
            role,
            index,
            process,
            parent_end,
            outbox,
            _by_pid(process.pid),
            _fork_server(),
            generation,
        )

    # ---- deaths

    def reap(self, child: Child) -> int | None:
        """Make sure a child whose pipe reached EOF is gone; its exit code, None when no
        one can tell (the fork server that started it died first)."""
        _stop_process(child, signals=True)
        # Not waited for: its thread may be failing a send, and an unexpected failure
        # there reports to on_error, which takes the lock the caller may hold.
        child.outbox.close(timeout_s=0)
        code = child.process.exitcode
        if code == 255 and child.starter is not None and not _running(child.starter):
            return None  # popen_forkserver's word for "the fork server is gone"
        return code

    def replace(self, child: Child, code: int | None, budget: RestartBudget) -> None:
        """A new process in a dead child's slot (a new fork server too, if that died).

        Raises:
            OSError: out of processes, file descriptors or memory.
        """
        new = self._start(child.role, child.index, child.generation + 1)
        slots = self.slots[child.role]
        slots[next(i for i, c in enumerate(slots) if c is child)] = new
        self._deferred.event(
            "process.restarted",
            {"restarts_in_window": budget.in_window},
            {"role": new.role, "index": new.index, "exit_code": code, "pid": new.process.pid},
        )

    def remove(self, child: Child) -> None:
        """Leave a dead child's slot empty (the pool is broken or closing)."""
        self.slots[child.role] = [c for c in self.slots[child.role] if c is not child]

    # ---- stop

    def stop(self) -> None:
        """Stop every child: asked, then SIGTERM, then SIGKILL. No child outlives this call."""
        children, self.slots = self.all(), {TRANSFORMER: [], PRODUCER: []}
        for child in children:
            child.outbox.put(STOP)
        for child in children:
            _stop_process(child, signals=True)
            child.outbox.close(JOIN_TIMEOUT_S)

    def close_lifeline(self) -> None:
        """Last: any process still holding a read end (the registry's) exits now."""
        self.lifeline_r.close()
        self._lifeline_w.close()


def _by_pid(pid: int | None) -> psutil.Process | None:
    try:
        return psutil.Process(pid) if pid is not None else None
    except psutil.Error:
        return None  # gone already


def _fork_server() -> psutil.Process | None:
    """The fork server now running, if this process started one (a private attribute;
    None when it is not there)."""
    from multiprocessing import forkserver

    return _by_pid(getattr(forkserver._forkserver, "_forkserver_pid", None))


def _running(process: psutil.Process | None) -> bool:
    """Whether ``process`` still runs: not exited, not a zombie, not a new process that
    took its pid (psutil checks the start time)."""
    try:
        return (
            process is not None
            and process.is_running()
            and process.status() != psutil.STATUS_ZOMBIE
        )
    except psutil.Error:
        return False


def _stop_process(child: Child, signals: bool) -> None:
    """Join; with ``signals``, then SIGTERM, then SIGKILL, sent by pid. Told by pid too,
    not by the process object alone: with its fork server dead, that object says the
    child exited (code 255) and would send no signal."""
    child.process.join(JOIN_TIMEOUT_S)
    for signum in (signal.SIGTERM, signal.SIGKILL) if signals else ():
        if not _running(child.pid):
            break
        try:
            child.pid.send_signal(signum)  # psutil checks the pid is still this process
        except psutil.Error:
            break
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while _running(child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
    child.process.join(0)  # reap it, when it is this process's own child (spawn)


def start_fork_server() -> None:
    """Start the fork server a pool's children come from (the default start method),
    ahead of the pool: its imports take 0.3 s, which the caller spends on other work
    before it opens the pool (a cached run merges the reused units' states).

    Raises:
        PipelineError: as opening the pool would, before the fork server starts (a
            fork server that imports the main script itself would run an unguarded
            caller again; 3.11's does not, only its children do).
    """
    from multiprocessing import forkserver

    check_children_can_start()
    _preload_in_forkserver()
    forkserver.ensure_running()


def _preload_in_forkserver() -> None:
    """Add ours to the fork server's preload list (it takes effect only if the fork
    server has not started yet in this process). The list is read from the private
    attribute that ``set_forkserver_preload`` writes, so a caller's own entries stay."""
    from multiprocessing import forkserver

    current = list(getattr(forkserver._forkserver, "_preload_modules", ["__main__"]))
    forkserver.set_forkserver_preload(
        current + [name for name in FORKSERVER_PRELOAD if name not in current]
    )
