"""Training checkpoints: atomic, resumable, layout-independent, with keep-last-K retention.

Layout of `save_dir` (default <run_dir>/checkpoints):

    latest                 text file: the directory name of the newest complete checkpoint
    step_00000100/
        dist/              megatron-core dist_checkpointing (torch_dist): model + optimizer,
                           stored as global tensors, so any TP/PP layout can load it
        train_state.json   step, consumed samples, skipped steps, the layout that wrote it
        rng/rank_00003.pt  per-rank RNG states (python, numpy, torch, CUDA, megatron tracker)
    .tmp-step_00000200/    a save in progress (or one that crashed: removed by the next save)

Atomicity: everything is written under `.tmp-step_N`; only when every rank has finished
(barrier; torch_dist fsyncs its files) rank 0 renames the directory to `step_N` and then moves
the `latest` pointer with os.replace. A crash at any point before that leaves `latest` on the
previous, complete checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel

from megatron_prolong.training.preemption import signals_blocked
from megatron_prolong.training.weights import model_sharded_state_dict, unwrap

LATEST = "latest"
# Optimizer state in model space: reshardable across TP, PP and DP on load.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_sharded_model_space",
                      "chained_optim_avoid_prefix": True}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which and what to do."""


@dataclass
class Progress:
    """Where training stands; saved with every checkpoint."""

    step: int = 0  # optimizer steps taken in the current LR schedule
    consumed_samples: int = 0  # data position: packed sequences consumed so far
    skipped_steps: int = 0  # non-finite losses skipped
    layout: dict = field(default_factory=dict)  # tp/pp/cp/dp/world_size that wrote it


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state(model: list, optimizer, with_optimizer: bool, is_loading: bool) -> dict:
    model_sd = model_sharded_state_dict(model)
    state = {"model": model_sd}
    if with_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=OPTIMIZER_METADATA)
    return state


class CheckpointManager:
    def __init__(self, save_dir: str, keep_last: int = 3) -> None:
        self.save_dir = os.path.abspath(save_dir)
        self.keep_last = keep_last

    # ----------------------------------------------------------------------------- finding
    def latest(self) -> Optional[str]:
        """The newest complete checkpoint directory, or None when there is none."""
        return resolve_checkpoint(self.save_dir, must_exist=False)

    def complete_checkpoints(self) -> list[str]:
        if not os.path.isdir(self.save_dir):
            return []
        names = sorted(n for n in os.listdir(self.save_dir) if n.startswith("step_"))
        return [os.path.join(self.save_dir, n) for n in names]

    # ----------------------------------------------------------------------------- saving
    def save(self, model: list, optimizer, progress: Progress) -> str:
        """Collective: every rank calls it. Returns the checkpoint directory."""
        name = step_dir_name(progress.step)
        tmp = os.path.join(self.save_dir, ".tmp-" + name)
        final = os.path.join(self.save_dir, name)
        if _rank() == 0:
            os.makedirs(self.save_dir, exist_ok=True)
            for stale in os.listdir(self.save_dir):  # crashed saves leave these behind
                if stale.startswith(".tmp-"):
                    shutil.rmtree(os.path.join(self.save_dir, stale), ignore_errors=True)
            os.makedirs(os.path.join(tmp, "dist"))
            os.makedirs(os.path.join(tmp, "rng"))
        _barrier()
        # The writer processes torch_dist starts here must outlive a preemption signal sent
        # to the whole process tree (Slurm does): see training/preemption.py.
        with signals_blocked():
            dist_checkpointing.save(_sharded_state(model, optimizer, True, False),
                                    os.path.join(tmp, "dist"))
        self._write_rank_files(tmp, progress)
        _barrier()  # every rank's files are on disk
        if _rank() == 0:
            self._publish(tmp, final, name)
        _barrier()
        return final

    def _write_rank_files(self, tmp: str, progress: Progress) -> None:
        import io

        buf = io.BytesIO()
        torch.save(rng_state(), buf)
        _fsync_write(os.path.join(tmp, "rng", f"rank_{_rank():05d}.pt"), buf.getvalue())
        if _rank() == 0:
            _fsync_write(os.path.join(tmp, "train_state.json"),
                         json.dumps(asdict(progress), indent=1).encode())

    def _publish(self, tmp: str, final: str, name: str) -> None:
        if os.path.exists(final):  # the same step saved again (e.g. a preempted re-run)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.save_dir)
        pointer = os.path.join(self.save_dir, LATEST)
        _fsync_write(pointer + ".tmp", (name + "\n").encode())
        os.replace(pointer + ".tmp", pointer)
        _fsync_dir(self.save_dir)
        for old in self.complete_checkpoints()[:-self.keep_last]:
            if os.path.basename(old) != name:
                shutil.rmtree(old, ignore_errors=True)

    # ----------------------------------------------------------------------------- loading
    def load(self, model: list, optimizer, directory: str, *, load_optimizer: bool = True,
             load_rng: bool = True) -> Progress:
        return load_checkpoint(model, optimizer, directory, load_optimizer=load_optimizer,
                               load_rng=load_rng)


def is_weights_only(directory: str) -> bool:
    """A bare dist_checkpointing directory of model weights (tools/convert.py hf-to-mcore,
    training/weights.save_model_weights): no optimizer, no training state."""
    return (os.path.exists(os.path.join(directory, "metadata.json"))
            and not os.path.exists(os.path.join(directory, "train_state.json")))


def resolve_checkpoint(path: str, must_exist: bool = True) -> Optional[str]:
    """A checkpoint directory from a run dir, a save dir (its `latest`), a step directory or a
    weights-only directory."""
    path = os.path.abspath(path)
    if is_weights_only(path):
        return path
    for candidate in (path, os.path.join(path, "checkpoints")):
        if os.path.exists(os.path.join(candidate, "train_state.json")):
            return candidate
        pointer = os.path.join(candidate, LATEST)
        if os.path.exists(pointer):
            with open(pointer) as f:
                target = os.path.join(candidate, f.read().strip())
            if not os.path.exists(os.path.join(target, "train_state.json")):
                raise CheckpointError(
                    f"{pointer} points at {target}, which is not a complete checkpoint; "
                    "point checkpoint.load at an existing step_* directory")
            return target
    if must_exist:
        raise CheckpointError(
            f"no checkpoint at {path}: expected a step_* directory with train_state.json, or a "
            "directory holding a `latest` pointer (a run's checkpoints/ folder)")
    return None


def read_progress(directory: str) -> Progress:
    with open(os.path.join(directory, "train_state.json")) as f:
        return Progress(**json.load(f))


def load_checkpoint(model: list, optimizer, directory: str, *, load_optimizer: bool = True,
                    load_rng: bool = True) -> Progress:
    """Collective. Loads model (and optimizer) state into the current layout, resharding
    TP/PP as needed; RNG states only when the layout is the one that saved them."""
    if is_weights_only(directory):
        from megatron_prolong.training.weights import load_model_weights

        load_model_weights(model, directory)
        optimizer.reload_model_params()  # fp32 main copies follow the loaded weights
        return Progress()
    progress = read_progress(directory)
    state = dist_checkpointing.load(
        _sharded_state(model, optimizer, load_optimizer, True), os.path.join(directory, "dist"))
    unwrap(model[0]).load_state_dict(state["model"])
    if load_optimizer:
        optimizer.load_state_dict(state["optimizer"])
    else:  # mixed precision keeps fp32 main copies of the weights: refresh them
        optimizer.reload_model_params()
    rng_file = os.path.join(directory, "rng", f"rank_{_rank():05d}.pt")
    if load_rng and _same_layout(progress.layout) and os.path.exists(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    return progress


def _same_layout(saved: dict) -> bool:
    from megatron.core import parallel_state as ps

    world = dist.get_world_size() if dist.is_initialized() else 1
    now = dict(tp=ps.get_tensor_model_parallel_world_size(),
               pp=ps.get_pipeline_model_parallel_world_size(),
               cp=ps.get_context_parallel_world_size(), world_size=world)
    return all(saved.get(k) == v for k, v in now.items())
