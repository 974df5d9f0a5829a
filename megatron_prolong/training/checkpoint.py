"""Training checkpoints: atomic, resumable, layout-independent, with keep-last-K retention.

Layout of `save_dir` (default <run_dir>/checkpoints):

    latest                 text file: the directory name of the newest complete checkpoint
    step_00000100/
        dist/              megatron-core dist_checkpointing (torch_dist): model + optimizer,
                           stored as global tensors, so any TP/PP layout can load it
        train_state.json   step, consumed samples, skipped steps, the layout that wrote it
        config.yaml        the resolved run config that wrote it: its `model:` section is the
                           shape a relaunch is checked against (and tools/convert.py reads)
        rng/rank_00003.json per-rank RNG states (python, numpy, torch, CUDA, megatron tracker)
                           as JSON numbers and base64 bytes: no pickle
        manifest.json      size and digest of every file above (training/manifest.py)
    .tmp-step_00000200/    a save in progress (or one that crashed: removed by the next save)

Atomicity: everything is written under `.tmp-step_N`; only when every rank has finished
(barrier; torch_dist fsyncs its files) rank 0 renames the directory to `step_N` and then moves
the `latest` pointer with os.replace. A crash at any point before that leaves `latest` on the
previous, complete checkpoint. A `latest` that points at a missing or damaged directory is
not trusted: the newest complete `step_*` is used instead, with a warning.

Nothing read back is trusted (docs/security.md): pickles go through an allow-list
(safe_unpickle.py, safe_dcp.py); every file is checked against the manifest before it is
loaded, and a resume falls back past a checkpoint that fails the check; `latest` may name only
a `step_*` directory of its own folder, and symbolic links are refused where checkpoints are
written or removed. A save that runs out of disk space removes its temporary directory and
ends with EXIT_RETRYABLE (75), which the Slurm scripts requeue. Readers (tools/evaluate.py)
hold a shared lock on the step directory they load; keep_last rotation skips a held one.
"""
from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import json
import os
import random
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing, tensor_parallel

from megatron_prolong.atomic_file import write_bytes_synced
from megatron_prolong.config import ConfigError, ModelConfig, RunConfig, config_from_dict, to_dict
from megatron_prolong.training import manifest
from megatron_prolong.training.agreement import on_all_ranks
from megatron_prolong.training.preemption import signals_blocked
from megatron_prolong.training.safe_dcp import (load_distributed, shard_extent_problems,
                                                wrapped_errors)
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


STEP_NAME = re.compile(r"step_\d{8,}")  # what `latest` may hold: a directory of its own folder
# Exit status of a run whose save failed for want of disk space: EX_TEMPFAIL of sysexits.h
# ("try again later"); slurm/common.sh requeues on it. 2, 3, 4 are taken (README).
EXIT_RETRYABLE = 75
# errno values from filesystems that cannot lock (see run_lock.py): readers go unlocked there.
_NO_LOCKING = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used; the message says which and what to do (exit 2)."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint whose files do not match its manifest; found before anything was loaded,
    so a resume may try an older one."""


class CheckpointGone(CheckpointError):
    """The checkpoint was removed (keep_last rotation) before a reader could hold it."""


class CheckpointOutOfSpace(RuntimeError):
    """A save ran out of disk space; its temporary directory is removed. Exit EXIT_RETRYABLE."""

    exit_code = EXIT_RETRYABLE


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
    try:
        write_bytes_synced(path, data)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointError(f"{path} is a symbolic link; checkpoint files are written only "
                                  "as regular files: remove the link") from None
        raise


def _refuse_link(path: str) -> None:
    if os.path.islink(path):
        raise CheckpointError(f"{path} is a symbolic link (to {os.readlink(path)}); the project "
                              "writes and removes checkpoints only as real directories inside "
                              "their folder: remove the link")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _on_every_rank(step):
    """Collective: `step()` on every rank; when it fails on some rank, every rank raises (none
    is left waiting at the next barrier), out-of-space kept recognisable. Returns its value."""
    error, value = None, None
    try:
        value = step()
    except Exception as exc:  # noqa: BLE001
        error = exc
    failures = manifest.all_gather(None if error is None else
                                   (_out_of_space(error), f"{type(error).__name__}: {error}"))
    first = next((f for f in failures if f), None)
    if error is None and first is not None:
        error = (OSError(errno.ENOSPC, first[1]) if first[0] else
                 RuntimeError(f"another rank failed to write its checkpoint files: {first[1]}"))
    if error is not None:
        raise error
    return value


def _out_of_space(exc: BaseException) -> bool:
    """Whether a failed save ran out of space: ENOSPC/EDQUOT anywhere in the exception chain
    (torch.distributed.checkpoint wraps its writers' errors), or torch's own short-write
    message ("unexpected pos 704 vs 598", which carries no errno)."""
    for e in wrapped_errors(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if any(s in text for s in ("No space left on device", "Disk quota exceeded",
                                   "unexpected pos")):
            return True
    return False


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _bytes_out(t: torch.Tensor) -> str:
    return base64.b64encode(t.detach().cpu().contiguous().numpy().tobytes()).decode()


def _bytes_in(text) -> torch.Tensor:
    if not isinstance(text, str):
        raise ValueError("expected base64 text")
    return torch.from_numpy(np.frombuffer(base64.b64decode(text, validate=True),
                                          dtype=np.uint8).copy())


def rng_state_json(state: dict) -> dict:
    """The RNG states as JSON data (numbers, base64 bytes): read back without unpickling."""
    version, words, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    out = {"format": 1, "python": [version, list(words), gauss],
           "numpy": [kind, keys.astype(np.uint32).tolist(), int(pos), int(has_gauss),
                     float(cached)],
           "torch": _bytes_out(state["torch"]),
           "tracker": {name: _bytes_out(t) for name, t in state["tracker"].items()}}
    if "cuda" in state:
        out["cuda"] = _bytes_out(state["cuda"])
    return out


def rng_state_from_json(data: dict, where: str) -> dict:
    """The inverse of rng_state_json, checking every field's type (one error naming the file)."""
    try:
        version, words, gauss = data["python"]
        if (not isinstance(version, int) or not isinstance(words, list) or len(words) != 625
                or not all(isinstance(w, int) and 0 <= w < 2**32 for w in words)
                or not (gauss is None or isinstance(gauss, float))):
            raise ValueError("python state malformed")
        kind, keys, pos, has_gauss, cached = data["numpy"]
        if (kind != "MT19937" or not isinstance(keys, list) or len(keys) != 624
                or not all(isinstance(k, int) and 0 <= k < 2**32 for k in keys)
                or not all(isinstance(v, int) for v in (pos, has_gauss))
                or not isinstance(cached, (int, float))):
            raise ValueError("numpy state malformed")
        tracker = data["tracker"]
        if not isinstance(tracker, dict):
            raise ValueError("tracker state malformed")
        state = {"python": (version, tuple(words), gauss),
                 "numpy": (kind, np.array(keys, dtype=np.uint32), pos, has_gauss, float(cached)),
                 "torch": _bytes_in(data["torch"]),
                 "tracker": {str(k): _bytes_in(v) for k, v in tracker.items()}}
        if "cuda" in data:
            state["cuda"] = _bytes_in(data["cuda"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: malformed RNG state ({exc}); delete the file to resume "
                              "with fresh RNG streams") from None
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

        def prepare() -> None:
            if _rank() != 0:
                return
            os.makedirs(self.save_dir, exist_ok=True)
            for stale in os.listdir(self.save_dir):  # crashed saves leave these behind
                if stale.startswith(".tmp-"):
                    _refuse_link(os.path.join(self.save_dir, stale))
                    shutil.rmtree(os.path.join(self.save_dir, stale), ignore_errors=True)
            _refuse_link(final)
            os.makedirs(os.path.join(tmp, "dist"))
            os.makedirs(os.path.join(tmp, "rng"))
        on_all_ranks(prepare)  # a refusal on rank 0 ends every rank, none waits at a barrier
        try:
            # The writer processes torch_dist starts here must outlive a preemption signal sent
            # to the whole process tree (Slurm does): see training/preemption.py.
            with signals_blocked():
                dist_checkpointing.save(_sharded_state(model, optimizer, True, False),
                                        os.path.join(tmp, "dist"))
            _on_every_rank(lambda: self._write_rank_files(tmp, progress))
            _barrier()  # every rank's files are on disk
            parts = manifest.all_gather(_on_every_rank(lambda: manifest.digest_own_files(tmp)))
            _on_every_rank(lambda: manifest.write_manifest(tmp, parts) if _rank() == 0 else None)
        except BaseException as exc:  # torch's CheckpointException is a BaseException
            # only out-of-space is turned into exit 75; everything else goes on as it was
            if not _out_of_space(exc):
                raise
            if _rank() == 0:  # a partial checkpoint must not stay behind as if it were whole
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointOutOfSpace(
                f"no space left on {self.save_dir} while saving step {progress.step}; removed "
                f"the partial checkpoint {tmp}. Free space there (or lower checkpoint.keep_last) "
                f"and relaunch: it resumes from its latest checkpoint (exit "
                f"{EXIT_RETRYABLE}: the Slurm scripts requeue)") from None
        if _rank() == 0:
            self._publish(tmp, final, name)
        _barrier()
        return final

    def _write_rank_files(self, tmp: str, progress: Progress) -> None:
        rng = json.dumps(rng_state_json(rng_state()))
        _fsync_write(os.path.join(tmp, "rng", f"rank_{_rank():05d}.json"), rng.encode())
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
                _remove_unless_held(old)

    # ----------------------------------------------------------------------------- loading
    def load(self, model: list, optimizer, directory: str, *, load_optimizer: bool = True,
             load_rng: bool = True) -> Progress:
        return load_checkpoint(model, optimizer, directory, load_optimizer=load_optimizer,
                               load_rng=load_rng)

    def resume(self, model: list, optimizer, first: str) -> tuple[Progress, str]:
        """Collective. Load `first` (the one `latest` names), or, when its files do not match
        their manifest, the newest older checkpoint that does (a warning names each skipped
        one and why). Returns (progress, the checkpoint loaded)."""
        candidates = [first] + [d for d in reversed(self.complete_checkpoints()) if d != first]
        skipped = []
        for directory in candidates:
            try:
                return load_checkpoint(model, optimizer, directory), directory
            except (CheckpointDamaged, CheckpointGone) as exc:
                skipped.append(str(exc))
                _warn(f"skipping checkpoint {directory}: {exc}")
        raise CheckpointError(f"no checkpoint in {self.save_dir} verifies ({'; '.join(skipped)}); "
                              "restore one from a copy, or move them aside to start from scratch")


def is_weights_only(directory: str) -> bool:
    """A bare dist_checkpointing directory of model weights (tools/convert.py hf-to-mcore,
    training/weights.save_model_weights): no optimizer, no training state."""
    return (os.path.exists(os.path.join(directory, "metadata.json"))
            and not os.path.exists(os.path.join(directory, "train_state.json")))


def complete_checkpoints(save_dir: str) -> list[str]:
    """The complete step_* directories of `save_dir`, oldest first (symbolic links, which
    would lead outside it, are not checkpoints of this folder)."""
    if not os.path.isdir(save_dir):
        return []
    steps = (os.path.join(save_dir, n) for n in sorted(os.listdir(save_dir))
             if STEP_NAME.fullmatch(n))
    return [d for d in steps if not os.path.islink(d) and is_complete(d)]


def is_complete(directory: str) -> bool:
    """A step directory that a save finished and that nothing obviously damaged since:
    readable train_state.json, the distributed checkpoint's metadata.json present, and every
    file of the manifest (when there is one) of the size it records (stat only; digests are
    checked when it is loaded)."""
    try:
        read_progress(directory)
    except (OSError, ValueError, TypeError):
        return False
    return (os.path.isfile(os.path.join(directory, "dist", "metadata.json"))
            and manifest.quick_check(directory) is None)


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
                named = f.read(256).strip()
        except (OSError, UnicodeDecodeError):
            named = None
        if named and not STEP_NAME.fullmatch(named):
            raise CheckpointError(
                f"{pointer} holds {named[:80]!r}, not the name of a step_* directory of "
                f"{save_dir}; a `latest` pointer never leads elsewhere (an absolute path or "
                "`..` is refused): write the step directory's name into it, or delete it")
        if named:
            _refuse_link(os.path.join(save_dir, named))
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
    damage = named and manifest.quick_check(os.path.join(save_dir, named))
    why = (f"{pointer} names {named}, which is missing or incomplete"
           + (f" ({damage})" if damage else "") if named else
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


def _verify(directory: str) -> None:
    """Collective: every file of the checkpoint against its manifest, each hashed by one rank
    (training/manifest.py); raises CheckpointDamaged naming the files that differ."""
    has_manifest, problems = manifest.verify(directory)
    if problems:
        raise CheckpointDamaged("; ".join(problems))
    if not has_manifest:
        dist_dir = os.path.join(directory, "dist")
        problems = shard_extent_problems(dist_dir if os.path.isdir(dist_dir) else directory)
        if problems:
            raise CheckpointDamaged("; ".join(problems))
        _warn(f"{directory} has no {manifest.MANIFEST} (saved before checkpoints carried "
              "digests): loading it unverified")


@contextlib.contextmanager
def held_for_reading(directory: str):
    """Collective. A shared flock on the step directory for the duration of a load: keep_last
    rotation (_remove_unless_held) does not remove a held checkpoint. Raises CheckpointGone,
    on every rank, when the directory was removed before it could be held."""
    fd, gone = None, None
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError as exc:
            if exc.errno not in _NO_LOCKING:
                raise
        # removed before the lock was ours (rotation holds it exclusively while deleting)
        if not os.path.isfile(os.path.join(directory, "dist", "metadata.json")):
            gone = f"{directory} was removed (keep_last rotation) before it could be read"
    except FileNotFoundError:
        gone = f"{directory} was removed (keep_last rotation) before it could be read"
    try:
        reports = manifest.all_gather(gone)
        gone = gone or next((r for r in reports if r), None)
        if gone:
            raise CheckpointGone(gone)
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _remove_unless_held(directory: str) -> None:
    """keep_last rotation: remove a checkpoint unless a reader holds it (then the next save's
    rotation removes it)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _warn(f"keeping {directory} past keep_last for now: a reader (tools/evaluate.py) is "
                  "loading it; a later save removes it")
            return
        except OSError as exc:
            if exc.errno not in _NO_LOCKING:
                raise
        shutil.rmtree(directory, ignore_errors=True)
    finally:
        os.close(fd)


def load_checkpoint(model: list, optimizer, directory: str, *, load_optimizer: bool = True,
                    load_rng: bool = True) -> Progress:
    """Collective. Loads model (and optimizer) state into the current layout, resharding
    TP/PP as needed; RNG states only when the layout is the one that saved them. The files are
    verified against the manifest first (CheckpointDamaged: nothing was loaded)."""
    if not load_optimizer or is_weights_only(directory):
        # mixed precision keeps fp32 main copies of the weights: refresh them
        progress = load_weights_only(model, directory) or Progress()
        optimizer.reload_model_params()
        return progress
    with held_for_reading(directory):
        _verify(directory)
        progress = read_progress(directory)
        state = load_distributed(_sharded_state(model, optimizer, True, True),
                                 os.path.join(directory, "dist"))
        unwrap(model[0]).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if load_rng and _same_layout(progress.layout):
            _load_rng(directory)
    return progress


def _load_rng(directory: str) -> None:
    path = os.path.join(directory, "rng", f"rank_{_rank():05d}.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: unreadable RNG state ({exc}); delete it to resume "
                                  "with fresh RNG streams") from None
        set_rng_state(rng_state_from_json(data, path))
    elif os.path.exists(path[:-len(".json")] + ".pt"):
        _warn(f"{directory}: the RNG states are in the old pickled rng/*.pt files, which are "
              "not read (docs/security.md); RNG streams continue from the seed instead")


def _same_layout(saved: dict) -> bool:
    from megatron.core import parallel_state as ps

    world = dist.get_world_size() if dist.is_initialized() else 1
    now = dict(tp=ps.get_tensor_model_parallel_world_size(),
               pp=ps.get_pipeline_model_parallel_world_size(),
               cp=ps.get_context_parallel_world_size(), world_size=world)
    return all(saved.get(k) == v for k, v in now.items())


def load_weights_only(model: list, directory: str) -> Optional[Progress]:
    """Collective. The model weights alone (evaluation: no optimizer exists), from a training
    checkpoint (step_N: returns its Progress) or a weights directory (returns None). The
    directory is held against keep_last rotation and verified while it is read."""
    if is_weights_only(directory):
        from megatron_prolong.training.weights import load_model_weights

        _verify(directory)
        load_model_weights(model, directory)
        return None
    with held_for_reading(directory):
        _verify(directory)
        state = load_distributed(_sharded_state(model, None, False, True),
                                 os.path.join(directory, "dist"))
        unwrap(model[0]).load_state_dict(state["model"])
        return read_progress(directory)
