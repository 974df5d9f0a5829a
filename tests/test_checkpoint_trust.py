"""Nothing read from a checkpoint runs code, escapes its folder or loads damaged without a word
(docs/security.md): allow-listed unpickling, the digest manifest, fall-back on resume, out of
space at a save, `latest`/symlink confinement, the reader lock, the Slurm requeue file."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from checkpoint_trust_cases import RunsCode, flip_byte  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every case that trains, in one process (tests/checkpoint_trust_cases.trained_runs)."""
    from checkpoint_trust_cases import trained_runs
    from distributed import run_distributed

    (out,) = run_distributed(trained_runs, 1, str(tmp_path_factory.mktemp("trust")))
    return out


@pytest.fixture
def saved(trained):
    """A real run of the tiny model: checkpoints step_00000001 and step_00000002."""
    return trained["saved"]


def _copy(saved, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    return run, run / "checkpoints" / "step_00000002"


def _rewrite_manifest(step_dir):
    """What an attacker who edits files does: digests recomputed to match."""
    from megatron_prolong.training import manifest

    manifest.write_manifest(str(step_dir), [manifest.digest_own_files(str(step_dir))])


@pytest.mark.slow  # a real checkpoint: one training run for the module
def test_crafted_metadata_is_refused_by_every_reader(saved, tmp_path):
    from megatron_prolong.convert.mcore_io import tensor_metadata
    from megatron_prolong.convert.mcore_to_hf import mcore_to_hf
    from megatron_prolong.training.safe_unpickle import RefusedPickle

    run, step = _copy(saved, tmp_path)
    marker = tmp_path / "metadata_ran"
    (step / "dist" / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    _rewrite_manifest(step)
    with pytest.raises(RefusedPickle, match=r"dist/\.metadata: refused to unpickle posix\.system"):
        tensor_metadata(str(step / "dist"))
    # tools/convert.py mcore-to-hf on the run directory (exit 2 on this ConfigError)
    with pytest.raises(RefusedPickle, match="refused to unpickle posix.system"):
        mcore_to_hf(str(run), str(tmp_path / "hf"))
    assert not marker.exists()


@pytest.mark.slow  # a real checkpoint: one training run for the module
def test_crafted_common_state_is_refused(saved, tmp_path):
    from megatron_prolong.training.safe_dcp import SafeCommonLoadStrategy
    from megatron_prolong.training.safe_unpickle import RefusedPickle

    _, step = _copy(saved, tmp_path)
    marker = tmp_path / "common_ran"
    torch.save({"optimizer": RunsCode(marker)}, step / "dist" / "common.pt")
    with pytest.raises(RefusedPickle, match="common.pt: refused to unpickle posix.system"):
        SafeCommonLoadStrategy().load_common(str(step / "dist"))
    assert not marker.exists()


@pytest.mark.slow  # a real checkpoint: one training run for the module
def test_rng_state_is_json_and_old_pickled_rng_files_are_not_run(saved, tmp_path, capsys):
    from megatron_prolong.training import checkpoint as ck

    _, step = _copy(saved, tmp_path)
    saved_rng = json.loads((step / "rng" / "rank_00000.json").read_text())
    state = ck.rng_state_from_json(saved_rng, "rank_00000.json")
    assert ck.rng_state_json(state) == saved_rng  # exact round trip, no pickle involved
    assert not list((step / "rng").glob("*.pt"))
    # A checkpoint from before: a crafted rng/rank_00000.pt is never unpickled.
    marker = tmp_path / "rng_ran"
    (step / "rng" / "rank_00000.json").unlink()
    torch.save({"python": RunsCode(marker)}, step / "rng" / "rank_00000.pt")
    ck._load_rng(str(step))
    assert not marker.exists()
    assert "rng/*.pt files, which are not read" in capsys.readouterr().err
    (step / "rng" / "rank_00000.json").write_text(json.dumps({**saved_rng, "numpy": ["x"]}))
    with pytest.raises(ck.CheckpointError, match="rank_00000.json: malformed RNG state"):
        ck._load_rng(str(step))


@pytest.mark.slow  # a real checkpoint: one training run for the module
def test_a_flipped_byte_or_a_truncated_shard_is_named(saved, tmp_path, capsys):
    from megatron_prolong.training import checkpoint as ck
    from megatron_prolong.training import manifest

    run, step = _copy(saved, tmp_path)
    shard = step / "dist" / "__0_1.distcp"
    assert manifest.verify(str(step)) == (True, [])
    flip_byte(shard)
    assert manifest.verify(str(step)) == (
        True, [f"{shard} does not match its digest in manifest.json (the file is damaged)"])
    with pytest.raises(ck.CheckpointDamaged, match="__0_1.distcp does not match its digest"):
        ck._verify(str(step))
    # Truncated: not even a candidate; the resume takes step 1 and says why.
    with open(shard, "r+b") as f:
        f.truncate(100)
    assert ck.resolve_checkpoint(str(run)) == str(run / "checkpoints" / "step_00000001")
    err = capsys.readouterr().err
    assert f"{shard} has 100 bytes, the manifest records" in err
    assert "using the newest complete checkpoint" in err
    # Without a manifest (older checkpoints): the metadata's extents still catch it.
    (step / "manifest.json").unlink()
    with pytest.raises(ck.CheckpointDamaged, match=r"__0_1\.distcp is 100 bytes, its metadata "
                                                   r"needs \d+ \(truncated\)"):
        ck._verify(str(step))


@pytest.mark.slow  # a real checkpoint: one training run for the module
def test_shard_paths_in_metadata_stay_in_their_folder(saved, tmp_path):
    from megatron_prolong.training.safe_dcp import SafeFileSystemReader
    from megatron_prolong.training.safe_unpickle import RefusedPickle

    _, step = _copy(saved, tmp_path)
    path = step / "dist" / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    next(iter(metadata.storage_data.values())).relative_path = "../../../etc/passwd"
    path.write_bytes(pickle.dumps(metadata))
    with pytest.raises(RefusedPickle, match="names the shard file '../../../etc/passwd'"):
        SafeFileSystemReader(str(step / "dist")).read_metadata()


def _fake_step(save, n):
    d = save / f"step_{n:08d}"
    (d / "dist").mkdir(parents=True)
    (d / "train_state.json").write_text(json.dumps({"step": n}))
    (d / "dist" / "metadata.json").write_text("{}")
    return d


@pytest.mark.parametrize("pointer", ["{elsewhere}", "../elsewhere/step_00000001",
                                     "step_00000001/../../elsewhere/step_00000001"])
def test_latest_never_leads_outside_its_folder(tmp_path, pointer):
    from megatron_prolong.training.checkpoint import CheckpointError, resolve_checkpoint

    save = tmp_path / "run" / "checkpoints"
    _fake_step(save, 1)
    elsewhere = _fake_step(tmp_path / "run" / "elsewhere", 1)
    (save / "latest").write_text(pointer.format(elsewhere=elsewhere) + "\n")
    with pytest.raises(CheckpointError, match="not the name of a step_\\* directory"):
        resolve_checkpoint(str(tmp_path / "run"))


def test_symlinks_are_refused_where_checkpoints_are_written(tmp_path):
    from megatron_prolong.config import ConfigError
    from megatron_prolong.training.checkpoint import (CheckpointError, CheckpointManager,
                                                      Progress, complete_checkpoints,
                                                      resolve_checkpoint)
    from megatron_prolong.training.run_lock import RunDirLock

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").symlink_to(victim)
    with pytest.raises(ConfigError, match="run.lock is a symbolic link"):
        RunDirLock(str(run)).acquire()
    save = run / "checkpoints"
    save.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("x")
    (save / ".tmp-step_00000005").symlink_to(target)
    with pytest.raises(CheckpointError, match=r"\.tmp-step_00000005 is a symbolic link"):
        CheckpointManager(str(save)).save([], None, Progress(step=5))
    assert victim.read_text() == "precious\n" and os.listdir(target) == ["keep"]
    # A step_* that is a link is no checkpoint of this folder, and `latest` may not name one.
    (save / ".tmp-step_00000005").unlink()
    outside = _fake_step(tmp_path / "outside", 7)
    (save / "step_00000007").symlink_to(outside)
    assert complete_checkpoints(str(save)) == []
    (save / "latest").write_text("step_00000007\n")
    with pytest.raises(CheckpointError, match="step_00000007 is a symbolic link"):
        resolve_checkpoint(str(run))


def test_rotation_skips_a_checkpoint_a_reader_holds(tmp_path):
    from megatron_prolong.training.checkpoint import (CheckpointGone, _remove_unless_held,
                                                      held_for_reading)

    step = _fake_step(tmp_path, 1)
    with held_for_reading(str(step)):
        _remove_unless_held(str(step))  # what keep_last rotation calls
        assert (step / "train_state.json").exists()
    _remove_unless_held(str(step))
    assert not step.exists()
    with pytest.raises(CheckpointGone, match="was removed .keep_last rotation."):
        with held_for_reading(str(step)):
            pass


@pytest.mark.slow
def test_resume_skips_a_damaged_checkpoint_and_refuses_crafted_extra_state(trained):
    resumed_from, err, final_step = trained["flipped"]
    assert resumed_from.endswith("step_00000001") and final_step == 3
    assert "skipping checkpoint" in err and "__0_0.distcp does not match its digest" in err
    kind, message, fqn, ran = trained["crafted"]
    assert not ran
    assert kind == "RefusedPickle" and "_extra_state" in fqn
    assert f"(object {fqn}): refused to unpickle posix.system" in message


@pytest.mark.slow
def test_out_of_space_at_a_save_removes_it_and_exits_75(trained):
    rc, err, left, latest = trained["out_of_space"]
    assert rc == 75
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    checkpoints = os.path.join(os.path.dirname(trained["saved"]), "out_of_space", "checkpoints")
    assert errors[0].startswith(f"error: no space left on {checkpoints} while saving step 2; "
                                "removed the partial checkpoint")
    assert left == ["latest", "step_00000001"] and latest == "step_00000001"


def _slurm_env(tmp_path, **extra):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/bash\ncase $1 in show) [[ $2 == hostnames ]] && echo localhost '
                        '|| echo "JobId=7 JobState=RUNNING";; *) echo "$@" >> '
                        f'{tmp_path}/requeued;; esac\n')
    scontrol.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "RUN_DIR": str(tmp_path / "run"), "SLURM_JOB_ID": "7", "REPO_DIR": REPO, **extra}


def test_requeue_counter_file_is_read_as_data(tmp_path):
    marker = tmp_path / "counter_ran"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "requeues_without_progress").write_text(
        f"checkpoint=none,step=none a[$(touch {marker})]\n")
    out = subprocess.run(["bash", "-c", 'source slurm/common.sh; requeue "preempted"'], cwd=REPO,
                         env=_slurm_env(tmp_path), capture_output=True, text=True)
    assert not marker.exists()
    assert out.returncode == 0 and "holds no count" in out.stderr
    assert (tmp_path / "requeued").read_text() == "requeue 7\n"


def test_exit_75_from_the_ranks_requeues_the_job(tmp_path):
    env = _slurm_env(tmp_path, SLURM_JOB_NODELIST="localhost")
    for name, rc in (("python", 0), ("srun", 75)):  # the dry run passes; the ranks exit 75
        stub = tmp_path / "bin" / name
        stub.write_text(f"#!/bin/bash\nexit {rc}\n")
        stub.chmod(0o755)
    out = subprocess.run(["bash", "-c", "source slurm/common.sh; prolong_train 1 recipe.yaml"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "exit 75: a checkpoint save ran out of disk space (retryable)" in out.stdout
    assert (tmp_path / "requeued").read_text() == "requeue 7\n"
