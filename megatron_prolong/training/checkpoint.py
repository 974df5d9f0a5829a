"""Training checkpoints: atomic, resumable, layout-independent, with keep-last-K retention.

Layout of `save_dir` (default <run_dir>/checkpoints):

    latest                 text file: the directory name of the newest complete checkpoint
    step_00000100/
        dist/              megatron-core dist_checkpointing (torch_dist): model + optimizer,
                           stored as global tensors, so any TP/PP layout can load it
        train_state.json   step, consumed samples, skipped steps, the layout that wrote it
        config.yaml        the resolved run config that wrote it: its `model:` section is the
                           shape a relaunch is checked against (and tools/convert.py reads)
        rng/rank_00003.pt  per-rank RNG states (python, numpy, torch, CUDA, megatron tracker)
    .tmp-step_00000200/    a save in progress (or one that crashed: removed by the next save)

Atomicity: everything is written under `.tmp-step_N`; only when every rank has finished
(barrier; torch_dist fsyncs its files) rank 0 renames the directory to `step_N` and then moves
the `latest` pointer with os.replace. A crash at any point before that leaves `latest` on the
previous, complete checkpoint. A `latest` that points at a missing or damaged directory is
not trusted: the newest complete `step_*` is used instead, with a warning.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing, tensor_parallel

from megatron_prolong.config import ConfigError, ModelConfig, RunConfig, config_from_dict, to_dict
from megatron_prolong.training.preemption import signals_blocked
from megatron_prolong.training.weights import model_sharded_state_dict, unwrap

LATEST = "latest"
STORED_CONFIG = "config.yaml"  # in every step directory: the run config that saved it
# The fields that decide tensor shapes; a checkpoint loads only into a model that agrees on
# all of them (rotary_base, max_position_embeddings etc. may change between stages).
MODEL_SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                      "num_query_groups", "vocab_size")
# Optimizer state in model space: reshardable across TP, PP and DP on load.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_sharded_model_space",
                      "chained_optim_avoid_prefix": True}


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used; the message says which and what to do (exit 2)."""


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
    def __init__(self, save_dir: str, keep_last: int = 3,
                 run_config: Optional[RunConfig] = None) -> None:
        self.save_dir = os.path.abspath(save_dir)
        self.keep_last = keep_last
        self.run_config = run_config  # stored with every checkpoint (its model shape)

    # ----------------------------------------------------------------------------- finding
    def latest(self) -> Optional[str]:
        """The newest complete checkpoint directory, or None when there is none."""
        return resolve_checkpoint(self.save_dir, must_exist=False)

    def complete_checkpoints(self) -> list[str]:
        return complete_checkpoints(self.save_dir)

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
            if self.run_config is not None:
                _fsync_write(os.path.join(tmp, STORED_CONFIG), yaml.safe_dump(
                    to_dict(self.run_config), sort_keys=False).encode())

    def _publish(self, tmp: str, final: str, name: str) -> None:
        if os.path.exists(final):  # the same step saved again (e.g. a preempted re-run)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.save_dir)
        pointer = os.path.join(self.save_dir, LATEST)
        _fsync_write(pointer + ".tmp", (name + "\n").encode())
        os.replace(pointer + ".tmp", pointer)
        _fsync_dir(self.save_dir)
        # Only complete checkpoints count towards keep_last; the loop never saves non-finite
        # weights, so every one kept is a good one to resume from.
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


def complete_checkpoints(save_dir: str) -> list[str]:
    """The complete step_* directories of `save_dir`, oldest first."""
    if not os.path.isdir(save_dir):
        return []
    steps = (os.path.join(save_dir, n) for n in sorted(os.listdir(save_dir))
             if n.startswith("step_"))
    return [d for d in steps if is_complete(d)]


def is_complete(directory: str) -> bool:
    """A step directory that a save finished and that nothing obviously damaged since:
    readable train_state.json and the distributed checkpoint's metadata.json present."""
    try:
        read_progress(directory)
    except (OSError, ValueError, TypeError):
        return False
    return os.path.isfile(os.path.join(directory, "dist", "metadata.json"))


def _warn(message: str) -> None:
    if _rank() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _follow_latest(save_dir: str) -> Optional[str]:
    """The checkpoint `save_dir/latest` names; when that is missing or damaged, the newest
    complete step_* (said on stderr); None when the directory holds no checkpoint at all."""
    pointer = os.path.join(save_dir, LATEST)
    named = None
    if os.path.exists(pointer):
        try:
            with open(pointer) as f:
                named = f.read().strip()
        except (OSError, UnicodeDecodeError):
            named = None
        if named and is_complete(os.path.join(save_dir, named)):
            return os.path.join(save_dir, named)
    complete = complete_checkpoints(save_dir)
    if not complete:
        if os.path.exists(pointer):
            raise CheckpointError(
                f"{pointer} names {named or '(unreadable)'}, which is missing or incomplete, and "
                f"{save_dir} holds no other complete step_* checkpoint; delete {pointer} to "
                "start from scratch")
        return None
    newest = complete[-1]
    why = (f"{pointer} names {named}, which is missing or incomplete" if named else
           f"{pointer} is unreadable" if os.path.exists(pointer) else f"{pointer} is missing")
    _warn(f"{why}; using the newest complete checkpoint {newest} instead")
    return newest


def resolve_checkpoint(path: str, must_exist: bool = True) -> Optional[str]:
    """A checkpoint directory from a run dir, a save dir (its `latest`), a step directory or a
    weights-only directory."""
    path = os.path.abspath(path)
    if is_weights_only(path):
        return path
    if os.path.exists(os.path.join(path, "train_state.json")):
        if not is_complete(path):
            raise CheckpointError(f"{path} is not a complete checkpoint (train_state.json or "
                                  "dist/ metadata unreadable); name another step_* directory")
        return path
    for candidate in (path, os.path.join(path, "checkpoints")):
        found = _follow_latest(candidate)
        if found:
            return found
    if must_exist:
        raise CheckpointError(
            f"no checkpoint at {path}: expected a step_* directory with train_state.json, or a "
            "directory holding a `latest` pointer (a run's checkpoints/ folder)")
    return None


def stored_model_config(directory: str) -> Optional[ModelConfig]:
    """The model a checkpoint was saved with: step_N/config.yaml (training) or model.yaml
    (tools/convert.py hf-to-mcore); None for checkpoints that predate either."""
    for name in (STORED_CONFIG, "model.yaml"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    raw = yaml.safe_load(f) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise CheckpointError(f"{path}: unreadable ({exc})") from None
            if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
                return config_from_dict({"model": raw["model"]}, where=path).model
    return None


def check_model_shape(directory: str, model: ModelConfig, advice: str) -> None:
    """Refuse, naming each differing field, a checkpoint whose tensors this model cannot hold."""
    saved = stored_model_config(directory)
    if saved is None:
        return
    differ = [f for f in MODEL_SHAPE_FIELDS if getattr(saved, f) != getattr(model, f)]
    if differ:
        raise CheckpointError(
            f"{directory} holds a model with "
            + ", ".join(f"model.{f}={getattr(saved, f)}" for f in differ)
            + "; this config has " + ", ".join(f"model.{f}={getattr(model, f)}" for f in differ)
            + f": {advice}")


def read_progress(directory: str) -> Progress:
    with open(os.path.join(directory, "train_state.json")) as f:
        return Progress(**json.load(f))


def load_checkpoint(model: list, optimizer, directory: str, *, load_optimizer: bool = True,
                    load_rng: bool = True) -> Progress:
    """Collective. Loads model (and optimizer) state into the current layout, resharding
    TP/PP as needed; RNG states only when the layout is the one that saved them."""
    if load_optimizer and not is_weights_only(directory):
        progress = read_progress(directory)
        state = dist_checkpointing.load(_sharded_state(model, optimizer, True, True),
                                        os.path.join(directory, "dist"))
        unwrap(model[0]).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    else:  # mixed precision keeps fp32 main copies of the weights: refresh them
        progress = load_weights_only(model, directory) or Progress()
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


def load_weights_only(model: list, directory: str) -> Optional[Progress]:
    """Collective. The model weights alone (evaluation: no optimizer exists), from a training
    checkpoint (step_N: returns its Progress) or a weights directory (returns None)."""
    if is_weights_only(directory):
        from megatron_prolong.training.weights import load_model_weights

        load_model_weights(model, directory)
        return None
    state = dist_checkpointing.load(_sharded_state(model, None, False, True),
                                    os.path.join(directory, "dist"))
    unwrap(model[0]).load_state_dict(state["model"])
    return read_progress(directory)
