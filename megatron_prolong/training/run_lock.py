"""One owner per run directory: an advisory lock that the kernel drops when its holder dies.

Global rank 0 takes `flock(LOCK_EX | LOCK_NB)` on `<dir>/run.lock` before anything in the run
directory is written (config.yaml, stale `.tmp-step_*` clean-up, checkpoints, metrics), keeps
the descriptor open for the life of the process and writes who it is into the file (host, pid,
Slurm job, start time). A second launch into the same directory fails to take the lock and
reads that record to say who holds it. The other ranks of a launch belong to its owner and take
no lock: two launches always have two rank 0s, and one of them loses.

The mechanism (flock, the holder record, no stale-lock clean-up, NFS/Lustre limits, filesystems
without locks) is megatron_prolong/file_lock.py's, shared with preprocessing's output prefixes.
"""
from __future__ import annotations

import os

from megatron_prolong.config import ConfigError
from megatron_prolong.file_lock import OwnerLock, describe_holder, holder_record  # noqa: F401

LOCK_FILE = "run.lock"


class RunDirBusy(ConfigError):
    """Another live process owns the run directory."""


class RunDirLock(OwnerLock):
    """`acquire()` or raise RunDirBusy naming the holder; `release()` (or process exit) frees it.
    The mechanism (flock, holder record, filesystems without locks) is file_lock.OwnerLock's."""

    guards = "this run directory"

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        super().__init__(os.path.join(self.directory, LOCK_FILE))

    def busy(self, holder: str) -> Exception:
        return RunDirBusy(f"{self.directory} is in use by {holder}; wait for that run to end or "
                          "stop it, or pass run_dir=... (and checkpoint.save_dir) for a separate "
                          "run")

    def unusable(self, exc: OSError) -> Exception:
        return ConfigError(f"{self.path}: cannot create the run directory's lock file "
                           f"({exc.strerror}); check run_dir")

    def symlinked(self) -> Exception:
        return ConfigError(f"{self.path} is a symbolic link; the run directory's lock file "
                           "must be a regular file: remove the link")
