"""Facts about other processes and the machine, needed by several modules; imports
nothing of ashstream."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 checks without sending anything); another
    user's process counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def default_memory_limit() -> int:
    """The cgroup's memory limit when there is one (containers), else the machine's RAM."""
    candidates = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
    for path in candidates:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # "max" or a huge number: no limit
            return int(text)
    import psutil  # here: the sinks import this module, and need no psutil

    return psutil.virtual_memory().total
