"""Bodies of tests/test_training_signals.py that train in a spawned process
(tests/distributed.py): a signal while a step's batches are collected, a first Ctrl-C."""
from __future__ import annotations

import json
import os
import signal

from training_cases import _latest, _runtime, run

GLOBAL_BATCH = 16  # micro-batches per step on one rank: collection polls every 8 of them


def signal_cases(root):
    from megatron_prolong.training import data_source

    _runtime()
    out = {}
    fetched: list[int] = []
    original = data_source.SyntheticPackedDataset.__getitem__

    def fetch(self, i):
        fetched.append(int(i))
        if sum(1 for j in fetched if j >= GLOBAL_BATCH) == 4:  # step 2's collection is under way
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, i)

    data_source.SyntheticPackedDataset.__getitem__ = fetch
    try:
        run_dir = os.path.join(root, "collecting")
        result = run([f"run_dir={run_dir}", f"training.global_batch_size={GLOBAL_BATCH}",
                      "training.seq_length=64", "training.loss_chunk_size=0"])
    finally:
        data_source.SyntheticPackedDataset.__getitem__ = original
    latest = _latest(run_dir)
    with open(os.path.join(run_dir, "checkpoints", latest, "train_state.json")) as f:
        consumed = json.load(f)["consumed_samples"]
    out["collecting"] = (result.stop_reason, result.final_step, latest, consumed,
                         sum(1 for i in fetched if i >= GLOBAL_BATCH),
                         os.path.exists(os.path.join(run_dir, "preempted")))

    # A first Ctrl-C during step 2: the run saves after it and stops, as on SIGTERM.
    def interrupt(step, *_):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
    run_dir = os.path.join(root, "ctrl_c")
    result = run([f"run_dir={run_dir}", "training.train_steps=50"], step_hook=interrupt)
    out["ctrl_c"] = (result.stop_reason, result.final_step, _latest(run_dir),
                     signal.getsignal(signal.SIGINT) == signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return out
