"""One owner per output: an advisory lock that the kernel drops when its holder dies.

The owner takes `flock(LOCK_EX | LOCK_NB)` on a lock file before it writes anything the lock
guards, keeps the descriptor open for the life of the process and writes who it is into the
file (host, pid, Slurm job, start time, command). A second process fails to take the lock and
reads that record to say who holds it.

No stale-lock clean-up is needed: a process that exits or is killed (SIGKILL included) closes
its descriptors and the kernel releases the lock; the file and its now stale record stay.
Limits (docs/training.md): on NFS, flock is a POSIX lock held by the NFS server, released when
the client's lease expires if its node died (NFSv4: about 90 s); Lustre needs the `flock`
mount option (with `localflock` only processes on the same node exclude each other); a
filesystem without locks gets a warning and runs unlocked.

Users: the run directory (training/run_lock.py) and a preprocessing output prefix
(data/preprocess.py). Imports nothing of the project, so every layer may use it.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from typing import Optional

# errno values that mean "this filesystem does not do locks", not "someone holds it".
_NO_LOCKING = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


def holder_record() -> dict:
    job = os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ.get('SLURM_ARRAY_JOB_ID', job)}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": job,
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}


def describe_holder(record: Optional[dict]) -> str:
    if not record:
        return "another process (it has not written its details yet)"
    text = f"pid {record.get('pid')} on host {record.get('host')}"
    if record.get("slurm_job_id"):
        text += f" (Slurm job {record['slurm_job_id']})"
    if record.get("started"):
        text += f", running since {record['started']}"
    return text


class OwnerLock:
    """`acquire()` or raise `busy(...)` naming the holder; `release()` (or process exit) frees
    it. Subclasses word the errors for what the lock guards."""

    guards = "this output"  # for the warning on a filesystem without locks

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._fd: Optional[int] = None

    def busy(self, holder: str) -> Exception:
        return BlockingIOError(f"{self.path} is held by {holder}")

    def unusable(self, exc: OSError) -> Exception:
        return exc

    def symlinked(self) -> Exception:
        return OSError(f"{self.path} is a symbolic link; a lock file must be a regular file: "
                       "remove the link")

    def acquire(self) -> bool:
        """True when locked; False (after a warning) where the filesystem has no locks."""
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            # O_CLOEXEC (Python's default): helper processes started with exec never inherit it.
            # O_NOFOLLOW: a lock file planted as a symbolic link is refused, not followed (the
            # holder record would overwrite its target).
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self.symlinked() from None
            raise self.unusable(exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise self.busy(describe_holder(self.read_holder())) from None
            if exc.errno in _NO_LOCKING:
                print(f"warning: {self.path}: the filesystem does not support file locks "
                      f"({exc.strerror}); {self.guards} is NOT protected against a second "
                      "writer", file=sys.stderr, flush=True)
                return False
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder_record()) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return True

    def read_holder(self) -> Optional[dict]:
        try:
            with open(self.path) as f:
                return json.loads(f.read() or "null")
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
