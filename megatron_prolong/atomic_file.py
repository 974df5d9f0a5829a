"""Small files that are either whole or absent: written beside their place, then renamed over it
(os.replace is atomic on POSIX), so a crash never leaves a half-written config, marker or
statistics file that a later run would read as whole; and files written whole and synced inside a
directory that is itself published by a rename. Imports nothing of the project."""
from __future__ import annotations

import os
from typing import Optional


def write_bytes_synced(path: str, data: bytes) -> None:
    """Write `data` to `path` and fsync it. O_NOFOLLOW: a symbolic link planted at the name is
    refused (OSError ELOOP), never followed to overwrite its target. For files inside a
    directory that is itself published by a rename (checkpoints)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomically(path: str, text: str, tmp: Optional[str] = None) -> None:
    """Write `text` to `path` through `tmp` (default: `path` + ".tmp-PID", unique per process,
    so concurrent writers never share a temporary file). Callers whose clean-up recognises
    their own temporary names pass `tmp`."""
    tmp = tmp or f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:  # a full disk, an interrupt: no temporary left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
