"""The shared-memory arena: one POSIX segment of fixed-size slots per stream.

The parent creates and unlinks every segment and registers it with multiprocessing's
resource tracker, which unlinks it even if the parent is SIGKILLed. Should the tracker
itself be killed, the parent still unlinks each segment it made, and registers the next
ones with a new tracker. Children map it by
name without registering, so no child's exit can unlink a segment still in use
(cpython issue 82300). The one exception: when the pool's process has died, a child
unlinks its segments and withdraws their registration (``unlink_segments_of``), so
that they are gone at once and the tracker has nothing to warn about. Names carry a
fixed prefix, the owner's pid and a run id, so segments of dead owners are swept at
start-up. Only this user's segments are ever looked at.

Batches travel as Arrow IPC streams written in place and read zero-copy; results travel
as the UTF-8 text itself. Queues carry only slot numbers and sizes.
"""

from __future__ import annotations

import _posixshmem  # the module multiprocessing.shared_memory is built on
import contextlib
import logging
import mmap
import os
import secrets
import threading
import warnings
from multiprocessing import resource_tracker

import psutil
import pyarrow as pa

from ashstream.batch_job import ipc_size
from ashstream.errors import ResourceError
from ashstream.procs import pid_alive

logger = logging.getLogger(__name__)

SEGMENT_PREFIX = "ashstream_"
SHM_DIR = "/dev/shm"


def _tracker() -> psutil.Process | None:
    """The resource tracker this process started, if it runs (a private attribute of
    multiprocessing's; None when it is not there or the tracker is gone)."""
    pid = getattr(resource_tracker._resource_tracker, "_pid", None)
    try:
        process = psutil.Process(pid) if pid is not None else None
        return process if process and process.status() != psutil.STATUS_ZOMBIE else None
    except psutil.Error:
        return None


_REGISTERING = threading.Lock()


def _register(name: str) -> psutil.Process | None:
    """Register a segment with the resource tracker, which unlinks it should this
    process be killed; returns the tracker it went to. A tracker that was killed is
    replaced (multiprocessing warns that resources might leak: ours do not, as the
    owner unlinks each segment itself and children unlink them if the owner dies)."""
    # catch_warnings swaps process-wide state: streams started from several threads at
    # once must not interleave it (one would leave "always" installed).
    with _REGISTERING, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resource_tracker.register("/" + name, "shared_memory")
    if caught:
        logger.debug("the resource tracker had died; a new one was started: %s", caught[0])
    return _tracker()


def _unregister(name: str, tracker: psutil.Process | None) -> None:
    """Withdraw a registration from the tracker that took it; not from a new one, which
    never saw the name (it would print a KeyError trace of its own)."""
    current = _tracker()
    if tracker is not None and current is not None and current.pid == tracker.pid:
        resource_tracker.unregister("/" + name, "shared_memory")


def new_pool_id() -> str:
    """``<pid>_<tag>``: names this pool's segments apart from another pool's of the same
    process, so that one pool's clean-up never touches another's."""
    return f"{os.getpid()}_{secrets.token_hex(2)}"


def segment_name(pool_id: str) -> str:
    """``ashstream_<pid>_<pool tag>_<stream tag>``: under macOS's 31-character limit."""
    return f"{SEGMENT_PREFIX}{pool_id}_{secrets.token_hex(3)}"


def our_segments() -> list[str]:
    """Names of this user's segments in /dev/shm that carry our prefix (another user's
    cannot be unlinked by us: /dev/shm is sticky)."""
    try:
        entries = [e for e in os.scandir(SHM_DIR) if e.name.startswith(SEGMENT_PREFIX)]
    except FileNotFoundError:
        return []
    names = []
    for entry in entries:
        try:
            if entry.stat().st_uid == os.getuid():
                names.append(entry.name)
        except FileNotFoundError:
            pass  # unlinked meanwhile
    return sorted(names)


def _owner_pid(name: str) -> int | None:
    try:
        return int(name[len(SEGMENT_PREFIX) :].split("_")[0])
    except ValueError:
        return None


def sweep_stale_segments() -> list[str]:
    """Unlink segments whose owner process no longer exists; returns their names."""
    swept = []
    for name in our_segments():
        pid = _owner_pid(name)
        if pid is not None and not pid_alive(pid):
            try:
                _posixshmem.shm_unlink("/" + name)
                swept.append(name)
            except OSError:
                pass  # unlinked meanwhile
    return swept


def unlink_segments_of(pool_id: str) -> list[str]:
    """In a child whose pool's process died: unlink the pool's segments and withdraw the
    pool's registration of each from the resource tracker (which children share), so the
    tracker does not warn of leaks at its exit. Only the process whose unlink succeeded
    withdraws a name: the tracker reports a second withdrawal as an error. (Were the
    tracker dead already, withdrawing would start a new one, which would then complain
    about a name it never saw: it dies last, so that does not happen.)"""
    unlinked = []
    for name in our_segments():
        if not name.startswith(f"{SEGMENT_PREFIX}{pool_id}_"):
            continue
        try:
            _posixshmem.shm_unlink("/" + name)
        except FileNotFoundError:
            continue
        unlinked.append(name)
        try:
            resource_tracker.unregister("/" + name, "shared_memory")
        except Exception:
            pass  # the tracker is gone too: nothing to withdraw from
    return unlinked


def check_free_space(nbytes: int) -> None:
    """Refuse to start when /dev/shm cannot hold ``nbytes``: a write past a full tmpfs
    kills the writer with SIGBUS instead of raising an error."""
    try:
        st = os.statvfs(SHM_DIR)
    except FileNotFoundError:
        raise ResourceError(
            f"{SHM_DIR} does not exist; ashstream needs POSIX shared memory"
        ) from None
    free = st.f_bavail * st.f_frsize
    if free < nbytes:
        raise ResourceError(
            f"{SHM_DIR} has {free / 2**20:.0f} MiB free but the stream needs "
            f"{nbytes / 2**20:.0f} MiB of shared memory. In a container give it more "
            "(docker run --shm-size=1g, or a memory-backed emptyDir in Kubernetes), "
            "or use fewer workers or a smaller slot size."
        )


def shm_free_text() -> str:
    """How full /dev/shm is now, for a message."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return f"{SHM_DIR} cannot be read"
    free, size = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    return f"{SHM_DIR} has {free / 2**20:,.0f} MiB free of {size / 2**20:,.0f} MiB"


class Arena:
    """``slots`` slots of ``slot_bytes`` each, in one mapping.

    Created by the parent with :meth:`create`; mapped by children with :meth:`attach`.
    """

    def __init__(
        self,
        name: str,
        slot_bytes: int,
        slots: int,
        mapping: mmap.mmap,
        tracker: psutil.Process | None = None,
        owner: bool = False,
    ):
        self.name = name
        self.slot_bytes = slot_bytes  # bytes per slot, a multiple of 64
        self.slots = slots
        self._mmap = mapping
        self._owner = owner  # True in the parent: it unlinks
        self._tracker = tracker  # the resource tracker it is registered with (parent)
        self._buffer = pa.py_buffer(mapping)  # one Arrow view of the whole mapping

    @classmethod
    def create(cls, slot_bytes: int, slots: int, pool_id: str) -> Arena:
        slot_bytes = -(-slot_bytes // 64) * 64
        size = slot_bytes * slots
        check_free_space(size)
        name = segment_name(pool_id)
        fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        tracker = None
        try:
            tracker = _register(name)
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size)
        except BaseException:
            _posixshmem.shm_unlink("/" + name)
            _unregister(name, tracker)
            raise
        finally:
            os.close(fd)
        return cls(name, slot_bytes, slots, mapping, tracker, owner=True)

    @classmethod
    def attach(cls, name: str, slot_bytes: int, slots: int) -> Arena:
        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
        try:
            mapping = mmap.mmap(fd, slot_bytes * slots)
        finally:
            os.close(fd)
        return cls(name, slot_bytes, slots, mapping)

    def resident_bytes(self) -> int:
        """Shared memory the segment really uses: tmpfs allocates pages on first touch."""
        try:
            return os.stat(os.path.join(SHM_DIR, self.name)).st_blocks * 512
        except FileNotFoundError:
            return 0

    def slot_buffer(self, slot: int, nbytes: int | None = None) -> pa.Buffer:
        """A zero-copy Arrow view of a slot (or of its first ``nbytes``).

        Raises:
            ValueError: the arena is closed.
        """
        buffer = self._buffer  # read once: a cancel may close the arena meanwhile
        if buffer is None:
            raise ValueError(f"the arena {self.name} is closed")
        return buffer.slice(slot * self.slot_bytes, self.slot_bytes if nbytes is None else nbytes)

    # ---- batches (producer writes, transformer reads)

    def write_batch(self, slot: int, batch: pa.RecordBatch) -> int | None:
        """Write ``batch`` as an Arrow IPC stream into ``slot``; its size, or None when
        it does not fit."""
        size = ipc_size(batch)
        if size > self.slot_bytes:
            return None
        start = slot * self.slot_bytes  # Buffer.slice() loses mutability; slice the mmap
        sink = pa.FixedSizeBufferWriter(pa.py_buffer(memoryview(self._mmap)[start : start + size]))
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)
        return size

    def read_batch(self, slot: int, nbytes: int) -> pa.RecordBatch:
        """The batch in ``slot``, zero-copy: drop it before the arena is closed."""
        return pa.ipc.open_stream(self.slot_buffer(slot, nbytes)).read_next_batch()

    # ---- text (transformer writes, parent reads)

    def write_bytes(self, slot: int, data: pa.Buffer | bytes) -> bool:
        if len(data) > self.slot_bytes:
            return False
        start = slot * self.slot_bytes
        self._mmap[start : start + len(data)] = memoryview(data)
        return True

    def read_bytes(self, slot: int, end: int, start: int = 0) -> bytes:
        """A copy of bytes ``start:end`` of ``slot``."""
        base = slot * self.slot_bytes
        return self._mmap[base + start : base + end]

    # ---- lifetime

    def close(self) -> None:
        """Unmap (and, in the parent, unlink). Every Arrow view must be gone by now."""
        self._buffer = None
        try:
            self._mmap.close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes with the process
        if self._owner:
            self._owner = False
            with contextlib.suppress(FileNotFoundError):
                _posixshmem.shm_unlink("/" + self.name)
            _unregister(self.name, self._tracker)
