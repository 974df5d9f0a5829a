"""One owner per run directory: an advisory lock that the kernel drops when its holder dies.

Global rank 0 takes `flock(LOCK_EX | LOCK_NB)` on `<dir>/run.lock` before anything in the run
directory is written (config.yaml, stale `.tmp-step_*` clean-up, checkpoints, metrics), keeps
the descriptor open for the life of the process and writes who it is into the file (host, pid,
Slurm job, start time). A second launch into the same directory fails to take the lock and
reads that record to say who holds it. The other ranks of a launch belong to its owner and take
no lock: two launches always have two rank 0s, and one of them loses.

No stale-lock clean-up is needed: a process that exits or is killed (SIGKILL included) closes
its descriptors and the kernel releases the lock; the file and its now stale record stay.
Limits (docs/training.md): on NFS, flock is a POSIX lock held by the NFS server, released when
the client's lease expires if its node died (NFSv4: about 90 s); Lustre needs the `flock`
mount option (with `localflock` only processes on the same node exclude each other); a
filesystem without locks gets a warning and runs unlocked.
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

from megatron_prolong.config import ConfigError

LOCK_FILE = "run.lock"
# errno values that mean "this filesystem does not do locks", not "someone holds it".
_NO_LOCKING = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


class RunDirBusy(ConfigError):
    """Another live process owns the run directory."""


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


class RunDirLock:
    """`acquire()` or raise RunDirBusy naming the holder; `release()` (or process exit) frees it."""

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        self.path = os.path.join(self.directory, LOCK_FILE)
        self._fd: Optional[int] = None

    def acquire(self) -> bool:
        """True when locked; False (after a warning) where the filesystem has no locks."""
        try:
            os.makedirs(self.directory, exist_ok=True)
            # O_CLOEXEC (Python's default): helper processes started with exec never inherit it.
            # O_NOFOLLOW: a run.lock planted as a symbolic link is refused, not followed (the
            # holder record would overwrite its target).
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ConfigError(f"{self.path} is a symbolic link; the run directory's lock file "
                                  "must be a regular file: remove the link") from None
            raise ConfigError(f"{self.path}: cannot create the run directory's lock file "
                              f"({exc.strerror}); check run_dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirBusy(
                    f"{self.directory} is in use by {describe_holder(self.read_holder())}; "
                    "wait for that run to end or stop it, or pass run_dir=... (and "
                    "checkpoint.save_dir) for a separate run") from None
            if exc.errno in _NO_LOCKING:
                print(f"warning: {self.path}: the filesystem does not support file locks "
                      f"({exc.strerror}); this run directory is NOT protected against a second "
                      "launch", file=sys.stderr, flush=True)
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
