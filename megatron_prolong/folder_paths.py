"""File names that a file on disk gives (an MDS index's shard basenames, a safetensors index's
shard files) are untrusted: they must name a regular file inside the folder that holds the
index, not `../../x`, `/etc/...` or `/dev/zero`.

The check is on the name itself (relative, no `..` that leaves the folder), not on where
symbolic links inside the folder point: the Hugging Face cache is a folder of symlinks into
`../../blobs/`, and a folder the user put links into is the user's choice. The target must be
a regular file, so a link to a device or a pipe is refused too (reading `/dev/zero` never
ends). Imports nothing of the project, so every layer may use it.
"""
from __future__ import annotations

import os


class OutsideFolder(ValueError):
    """A name from a file on disk points outside its folder, or not at a regular file."""


def path_inside(folder: str, name) -> str:
    """`folder`/`name`, after checking that `name` is a relative path that stays in `folder`;
    raises OutsideFolder (the message says what is wrong with the name)."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise OutsideFolder(f"{name!r} is not a file name")
    if os.path.isabs(name):
        raise OutsideFolder(f"{name!r} is an absolute path; only names relative to {folder} "
                            "are read")
    norm = os.path.normpath(name)
    if norm in (".", os.curdir) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
        raise OutsideFolder(f"{name!r} points outside {folder}; only files inside it are read")
    return os.path.join(folder, norm)


def is_other_than_regular_file(path: str) -> bool:
    """True for something that exists but is no regular file (a device, pipe, directory),
    following symbolic links."""
    return os.path.exists(path) and not os.path.isfile(path)
