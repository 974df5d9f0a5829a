"""A one-node Slurm cluster for tests (scripts/slurm_local.sh) and what tests do with it.

The `slurm_cluster` fixture (conftest.py) starts one cluster per test session and stops it at
the end; tests skip with the harness's reason where it cannot run (not root, not Debian-like,
no apt-get, the install failed). Jobs run the slurm/*.sh scripts exactly as shipped: the CPU
settings come from variables and sbatch options (CPU_SBATCH), never from edits.
"""
from __future__ import annotations

import os
import re
import subprocess
import time
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(REPO, "scripts", "slurm_local.sh")
CANNOT_RUN = 3  # the harness's exit status for "this machine cannot host a cluster"

# Two CPU tasks on the harness's `cpu` partition in place of the scripts' GPU resources.
CPU_SBATCH = ["--partition=cpu", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
              "--gpus-per-node=0", "--mem=4G", "--time=30"]
# Deadlines here only bound a hang: every wait ends on a state, never at a moment. Generous,
# because a loaded machine (load average 15 on 2 cores) runs these jobs many times slower.
HANG_S = 1800
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class SlurmUnavailable(RuntimeError):
    """This machine cannot host the test cluster; the message says why."""


class SlurmCluster:
    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.conf = os.path.join(directory, "slurm.conf")

    # ------------------------------------------------------------------------- life cycle
    @classmethod
    def start(cls, directory: str) -> "SlurmCluster":
        """Start a cluster in `directory` (keep its path short: the MUNGE socket lives there,
        and UNIX socket paths are limited to 108 bytes)."""
        proc = subprocess.run(["bash", HARNESS, "start", directory], capture_output=True,
                              text=True, timeout=900)
        if proc.returncode == CANNOT_RUN:
            raise SlurmUnavailable(proc.stderr.strip().splitlines()[-1])
        if proc.returncode != 0:
            raise RuntimeError(f"scripts/slurm_local.sh start failed:\n{proc.stdout}{proc.stderr}")
        return cls(directory)

    def stop(self) -> None:
        subprocess.run(["bash", HARNESS, "stop", self.dir], capture_output=True, timeout=120)

    @property
    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": self.conf}

    def run(self, *cmd: str) -> str:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
        return proc.stdout

    # ------------------------------------------------------------------------- jobs
    def sbatch(self, script: str, options: list[str], env: dict, log_dir: str) -> int:
        """Submit `script` (a path relative to the repository root, from where users run
        sbatch) with `env` on top of this process's environment; the job log goes to
        log_dir/<job name>-<job id>.out. Returns the job id."""
        os.makedirs(log_dir, exist_ok=True)
        cmd = ["sbatch", "--parsable", f"--output={log_dir}/%x-%j.out", *options, script]
        proc = subprocess.run(cmd, cwd=REPO, env={**self.env, **env}, capture_output=True,
                              text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, StdOut, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def log(self, job_id: int) -> str:
        path = self.job(job_id)["StdOut"]
        return open(path).read() if os.path.exists(path) else ""

    def wait(self, job_id: int, until: Callable[[dict], bool], what: str,
             timeout: float = HANG_S) -> dict:
        end = time.time() + timeout
        while True:
            info = self.job(job_id)
            if until(info):
                return info
            if time.time() > end:
                raise AssertionError(f"job {job_id}: not {what} after {timeout:.0f}s "
                                     f"({info.get('JobState')}); log:\n{self.log(job_id)[-4000:]}")
            time.sleep(0.2)

    def wait_done(self, job_id: int, timeout: float = HANG_S) -> dict:
        """A final state, shown only once the job has left COMPLETING: every process of it,
        the batch script included, has ended, so nothing about it can change any more."""
        return self.wait(job_id, lambda j: j["JobState"] in FINAL_STATES, "finished", timeout)

    def wait_requeued(self, job_id: int, timeout: float = HANG_S) -> dict:
        """Restarts went up and the job has left COMPLETING (scontrol shows COMPLETING while
        the old run's processes end, with Restarts already counted): PENDING, REQUEUED or
        running again. Or a final state, when it was not requeued."""
        return self.wait(job_id, lambda j: j["JobState"] in FINAL_STATES or (
            int(j["Restarts"]) >= 1 and j["JobState"] != "COMPLETING"), "requeued", timeout)

    def wait_for_log(self, job_id: int, text: str, timeout: float = HANG_S) -> str:
        """The job's log once it holds `text` (a line the job prints when it decides); fails
        as soon as the job has ended (left COMPLETING) without printing it."""
        end = time.time() + timeout
        while True:
            ended = self.job(job_id)["JobState"] in FINAL_STATES  # before reading the log
            log = self.log(job_id)
            if text in log:
                return log
            if ended or time.time() > end:
                info = self.job(job_id)
                raise AssertionError(
                    f"job {job_id}: no {text!r} in its log ({info['JobState']}, exit "
                    f"{info['ExitCode']}, after {timeout - (end - time.time()):.0f}s); "
                    f"log:\n{log[-4000:]}")
            time.sleep(0.2)

    def signal(self, job_id: int, sig: str, batch: bool) -> None:
        """scancel --signal: to the batch shell only (--batch, what #SBATCH --signal=B:... does)
        or to every process of the job's steps (how Slurm signals a step)."""
        self.run("scancel", f"--signal={sig}", *(["--batch"] if batch else []), str(job_id))
