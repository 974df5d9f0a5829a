"""Small files that are either whole or absent: written beside their place, then renamed over it
(os.replace is atomic on POSIX), so a crash never leaves a half-written config, marker or
statistics file that a later run would read as whole. Imports nothing of the project."""
from __future__ import annotations

import os
from typing import Optional


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
