"""Where runs say they are running, for ``ashstream status``: one 0600 JSON file per
pool in a private runtime directory of this user, removed when the pool closes (a
file whose process is gone is stale, and the next reader removes it).

The local engine's file says where its registry process listens; an engine without
one (Ray) writes its streams into the file itself, rewritten in place about once a
second.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

# How often an engine that writes its streams into its file rewrites it at most.
REWRITE_INTERVAL_S = 1.0


def runtime_dir() -> Path:
    """This user's private directory for the status files (mode 0700)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = Path(base) / f"ashstream-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    if path.stat().st_uid != os.getuid() or path.stat().st_mode & 0o077:
        raise PermissionError(f"{path} must belong to this user and be private (0700)")
    return path


def new_status_file(info: dict[str, Any]) -> Path:
    """Create this process's status file holding ``info``; its path."""
    path = runtime_dir() / f"{os.getpid()}-{secrets.token_hex(4)}.json"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w") as f:
            json.dump({"pid": os.getpid(), "started_at": time.time(), **info}, f)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def rewrite_status_file(path: Path, info: dict[str, Any]) -> None:
    """Replace the file's content at once (a reader sees the old or the new whole)."""
    temp = path.with_suffix(".tmp")
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as f:
        json.dump(info, f, default=str)
    os.replace(temp, path)
