"""Bodies of tests/test_checkpoint_trust.py that train: run on one CPU rank by tests/distributed.py."""
from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import pickle
import shutil

from training_cases import _runtime, run


class RunsCode:
    """A pickle that, unpickled by plain pickle, runs a shell command (touches `marker`)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def trained_runs(root):
    """One process for every case that trains (imports and start-up are most of a case's time):
    a run with checkpoints step_00000001/2 (`saved`, left as it is for the other tests), the
    resume cases on copies of it, then train.py's main out of disk space (it ends the process
    group, so it comes last)."""
    _runtime()
    saved = os.path.join(root, "saved")
    run([f"run_dir={saved}", "training.train_steps=2", "checkpoint.save_interval=1"])
    out = resume_cases(saved, root)
    out["saved"] = saved
    out["out_of_space"] = out_of_space_case(os.path.join(root, "out_of_space"))
    return out


def plant_extra_state(step_dir, marker):
    """Point one extra-state object of step_dir at a crafted blob, as an attacker would: new shard
    file, .metadata rewritten with plain pickle, manifest recomputed to match."""
    import torch
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from megatron_prolong.training import manifest

    dist_dir = os.path.join(step_dir, "dist")
    with open(os.path.join(dist_dir, ".metadata"), "rb") as f:
        metadata = pickle.load(f)  # our own file, trusted here
    index = next(i for i in metadata.storage_data
                 if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata))
    blob = io.BytesIO()
    torch.save([RunsCode(marker)], blob)
    with open(os.path.join(dist_dir, "__0_9.distcp"), "wb") as f:
        f.write(blob.getvalue())
    info = metadata.storage_data[index]
    info.relative_path, info.offset, info.length = "__0_9.distcp", 0, len(blob.getvalue())
    with open(os.path.join(dist_dir, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)
    manifest.write_manifest(step_dir, [manifest.digest_own_files(step_dir)])
    return index.fqn


def flip_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


def resume_cases(saved, root):
    """A resume past a flipped byte, and a resume into a crafted extra-state object."""
    out = {}
    flipped = os.path.join(root, "flipped")
    shutil.copytree(saved, flipped)
    flip_byte(os.path.join(flipped, "checkpoints", "step_00000002", "dist", "__0_0.distcp"))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        result = run([f"run_dir={flipped}", "training.train_steps=3", "checkpoint.save_interval=1"])
    out["flipped"] = (result.resumed_from, err.getvalue(), result.final_step)

    crafted = os.path.join(root, "crafted")
    shutil.copytree(saved, crafted)
    marker = os.path.join(root, "extra_state_ran")
    fqn = plant_extra_state(os.path.join(crafted, "checkpoints", "step_00000002"), marker)
    try:
        run([f"run_dir={crafted}", "training.train_steps=3"])
        out["crafted"] = ("loaded", "", fqn, os.path.exists(marker))
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        out["crafted"] = (type(exc).__name__, str(exc), fqn, os.path.exists(marker))
    return out


def out_of_space_case(root):
    """train.py's main with a writer that hits ENOSPC at the step-2 save (a stub at the point
    where torch.distributed.checkpoint writes each item; the writer processes are forked, so
    they inherit it)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_prolong.train import main
    from megatron_prolong.training import checkpoint as ckpt_mod
    from training_cases import BASE

    disk = {"full": False}
    write_item = filesystem_async._write_item
    save = ckpt_mod.CheckpointManager.save

    @functools.wraps(write_item)  # megatron passes arguments by the signature it inspects
    def full_write(*args, **kwargs):
        if disk["full"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_item(*args, **kwargs)

    def save_then_fill(self, model, optimizer, progress):
        disk["full"] = progress.step >= 2
        return save(self, model, optimizer, progress)

    filesystem_async._write_item = full_write
    ckpt_mod.CheckpointManager.save = save_then_fill
    # train.py takes a recipe first: a one-line one, the rest as the tests' BASE overrides.
    os.makedirs(root, exist_ok=True)
    recipe = os.path.join(root, "recipe.yaml")
    with open(recipe, "w") as f:
        f.write("name: out_of_space\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main([recipe] + BASE + [f"run_dir={root}", "training.train_steps=3",
                                     "checkpoint.save_interval=1"])
    checkpoints = os.path.join(root, "checkpoints")
    with open(os.path.join(checkpoints, "latest")) as f:
        latest = f.read().strip()
    return rc, err.getvalue(), sorted(os.listdir(checkpoints)), latest
