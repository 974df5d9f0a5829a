"""Preemption: SIGTERM/SIGUSR1 (and a first Ctrl-C) become a flag the training loop acts on,
from process start to exit.

Standard library only at import time, so that `megatron_prolong.train` can install the flag before
torch and megatron-core are imported: a signal that lands during start-up is recorded, not fatal.

Slurm delivers a step's signal to every process of the step (proctrack: the whole process tree),
not only to the training rank, so the run's helper processes must not die of it. The run starts
them all in megatron-core's torch_dist save (dist_checkpointing/strategies/filesystem_async.py):
- on the first save, a spawned multiprocessing manager (the results queue), and with it
  multiprocessing's resource tracker; both live until the run exits;
- on every save, `thread_count` (2) forked writer processes.
A spawned process starts with the default dispositions (SIGTERM and SIGUSR1 terminate): the
manager died and the save failed with BrokenPipeError/EOFError. A blocked-signal mask, unlike a
Python handler, is inherited across fork and exec, so `signals_blocked()` around the save makes
every helper started there immune for its whole life, while the training process still records
the signal (another of its threads takes it, or it is delivered when the mask is restored).
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Iterator, Optional

from megatron_prolong.atomic_file import write_text_atomically

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Ctrl-C: the first one stops like a preemption (checkpoint, exit 0); the second aborts at once.
# Not among the signals blocked around saves: an abort must work while a save hangs.
INTERRUPT = signal.SIGINT
# Micro-batches between two agreed checks of the flag while a step's batches are collected.
COLLECTION_POLL_INTERVAL = 8
# Left in run_dir by a run that stopped for preemption (the launcher requeues on it); the next
# launch of the run removes it.
PREEMPTED_MARKER = "preempted"


class PreemptionFlag:
    """SIGTERM/SIGUSR1 (Slurm preemption, `scancel --signal`, time limits) and a first SIGINT
    (Ctrl-C) set a flag; the loop checks it on every rank together (before the first step,
    every COLLECTION_POLL_INTERVAL micro-batches while a step's batches are collected, and
    after each step), then saves and exits cleanly. A second SIGINT aborts at once: the first
    one puts back the default action (the kernel ends the process, whatever Python is doing;
    no checkpoint is written, the last complete one stays).

    Used as a context manager. Previous handlers come back on exit unless a signal was
    received: a preempted process is on its way out and a repeated signal must not kill it
    while it tears down."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict = {}
        self._pid = os.getpid()  # forked helpers inherit the handler; they say nothing

    def __enter__(self) -> "PreemptionFlag":
        # SIGINT first: once SIGTERM is caught, Ctrl-C is too (tests wait for that state).
        for sig in (INTERRUPT,) + PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.received is None:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum, _frame) -> None:
        if self.received is None:  # the first one says why (a time limit: TERM, then more)
            self.received = signum
        if signum == INTERRUPT:
            signal.signal(INTERRUPT, signal.SIG_DFL)
            if os.getpid() == self._pid and os.environ.get("RANK", "0") == "0":
                os.write(2, b"\nSIGINT: stopping cleanly (after the current step, with a "
                            b"checkpoint if anything was trained); press Ctrl-C again to abort "
                            b"at once without saving\n")

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "none"

    def any_rank(self) -> bool:
        """Collective: True when any rank got a signal (srun may signal only some)."""
        import torch
        import torch.distributed as dist

        from megatron_prolong.training.parallel import collective_device

        flag = torch.tensor([1.0 if self.received is not None else 0.0],
                            device=collective_device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def collection_poll(flag: PreemptionFlag):
    """`interrupted()` for DataSource.next_step: every COLLECTION_POLL_INTERVAL micro-batches
    all ranks ask `flag.any_rank()` together (they collect the same number of micro-batches,
    so the collectives match), and give up the step when any rank was signalled."""
    collected = 0

    def interrupted() -> bool:
        nonlocal collected
        collected += 1
        return collected % COLLECTION_POLL_INTERVAL == 0 and flag.any_rank()
    return interrupted


@contextlib.contextmanager
def signals_blocked(signals=PREEMPTION_SIGNALS) -> Iterator[None]:
    """Block `signals` in this thread; every process started inside inherits the block.

    A signal sent meanwhile is not lost: it is handled by another thread of this process or
    delivered when the previous mask is restored, so the PreemptionFlag still sees it."""
    from multiprocessing import resource_tracker

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        # The first spawn starts multiprocessing's resource tracker, and starting it unblocks
        # SIGINT/SIGTERM in this thread (CPython's bpo-33613 mask dance): start it now (or
        # check that it is alive), then block again, so that what is spawned next keeps both.
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def write_preempted_marker(run_dir: str, step: int, signal_name: str,
                           checkpoint: Optional[str]) -> None:
    """Rank 0: tell the launcher this run stopped for preemption and should be relaunched."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, PREEMPTED_MARKER)
    write_text_atomically(path, f"step {step} signal {signal_name} time "
                                f"{time.strftime('%Y-%m-%dT%H:%M:%S')} resume from "
                                f"{checkpoint or '(the run start)'}\n")


def clear_preempted_marker(run_dir: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(run_dir, PREEMPTED_MARKER))
