"""slurm/preprocess.sh without Slurm: its array-task and merge steps run here as Slurm would
run them, and `submit` is checked against a stand-in sbatch that records its command lines.
(bash -n and shellcheck: tests/test_slurm.py covers every script.)"""
import json
import os
import stat
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "slurm", "preprocess.sh")


def _bytes(prefix, ext):
    with open(prefix + ext, "rb") as f:
        return f.read()


def _bash(args, env=None, cwd=None):
    env = {**os.environ, "REPO_DIR": REPO, **(env or {})}
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=env,
                          cwd=cwd or REPO, timeout=900)  # bounds a hang only


def _corpus(tmp_path):
    paths = []
    for k in range(3):
        p = tmp_path / f"in{k}.jsonl"
        p.write_text("".join(json.dumps({"text": f"file {k} record {i} " * (i + 1)}) + "\n"
                             for i in range(20)))
        paths.append(str(p))
    return paths


def _assert_equals_one_process(args, prefix, single):
    """`prefix` holds, byte for byte, what one preprocessing process writes from `args`."""
    proc = subprocess.run(["python", "tools/preprocess_data.py", *args, "--output-prefix", single],
                          cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr
    for ext in (".bin", ".idx"):
        assert _bytes(prefix, ext) == _bytes(single, ext)


def test_array_tasks_then_merge_equal_one_process(tmp_path):
    _corpus(tmp_path)
    args = ["--input", str(tmp_path / "in*.jsonl"), "--tokenizer", "byte", "--quiet"]
    prefix = str(tmp_path / "out")
    for task in (2, 0, 1):  # array tasks finish in any order
        r = _bash(["shard", "3", prefix, *args], {"SLURM_ARRAY_TASK_ID": str(task),
                                                 "SLURM_CPUS_PER_TASK": "1"})
        assert r.returncode == 0, r.stderr
    r = _bash(["merge", "3", prefix])
    assert r.returncode == 0, r.stderr
    _assert_equals_one_process(args, prefix, str(tmp_path / "single"))


def test_merge_step_fails_while_a_shard_is_missing(tmp_path):
    _corpus(tmp_path)
    prefix = str(tmp_path / "out")
    r = _bash(["shard", "2", prefix, "--input", str(tmp_path / "in0.jsonl"), "--tokenizer",
               "byte", "--quiet"], {"SLURM_ARRAY_TASK_ID": "0"})
    assert r.returncode == 0, r.stderr
    r = _bash(["merge", "2", prefix])
    assert r.returncode == 2 and "index 1" in r.stderr


def test_shard_step_needs_the_array_index(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SLURM_ARRAY_TASK_ID"}
    r = subprocess.run(["bash", SCRIPT, "shard", "2", str(tmp_path / "o"), "--input", "x"],
                       capture_output=True, text=True, env={**env, "REPO_DIR": REPO})
    assert r.returncode != 0 and "SLURM_ARRAY_TASK_ID" in r.stderr
    assert _bash(["shard", "0", "p"]).returncode == 2  # N must be positive
    assert _bash(["run", "2", "p"]).returncode == 2


def test_submit_makes_an_array_job_and_a_dependent_merge(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch.log"
    fake = bin_dir / "sbatch"  # prints a job id as `sbatch --parsable` does
    fake.write_text('#!/bin/bash\nprintf "%s\\n" "$*" >> "$SBATCH_LOG"\n'
                    'echo $((4000 + $(wc -l < "$SBATCH_LOG")))\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SBATCH_LOG": str(log),
           "MAX_PARALLEL": "8", "SBATCH_ARGS": "--partition=cpu"}
    r = _bash(["submit", "16", "data/code", "--input", "stack/*.jsonl.gz", "--group-key",
               "repo_name"], env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    shard_cmd, merge_cmd = log.read_text().splitlines()
    assert "--partition=cpu --array=0-15%8" in shard_cmd
    assert shard_cmd.endswith("slurm/preprocess.sh shard 16 data/code --input stack/*.jsonl.gz "
                              "--group-key repo_name")
    assert "--dependency=afterok:4001" in merge_cmd
    assert merge_cmd.endswith("slurm/preprocess.sh merge 16 data/code")
    assert "job 4001" in r.stdout and "job 4002" in r.stdout


@pytest.mark.slow
def test_submit_under_slurm_runs_the_array_then_the_merge(slurm_cluster, tmp_path):
    """`submit` under a real Slurm (scripts/slurm_local.sh): the array tasks and the dependent
    merge job run by themselves and leave the dataset one process writes, byte for byte."""
    import re

    _corpus(tmp_path)
    args = ["--input", str(tmp_path / "in*.jsonl"), "--tokenizer", "byte", "--quiet"]
    prefix = str(tmp_path / "out")
    logs = tmp_path / "logs"
    logs.mkdir()
    sbatch_args = f"--partition=cpu --cpus-per-task=1 --mem=1G --output={logs}/%x-%j.out"
    r = _bash(["submit", "3", prefix, *args], {**slurm_cluster.env, "SBATCH_ARGS": sbatch_args})
    assert r.returncode == 0, r.stderr
    merge_job = int(re.search(r"merge: job (\d+) after all succeed", r.stdout).group(1))
    merged = slurm_cluster.wait_done(merge_job)
    assert merged["JobState"] == "COMPLETED", slurm_cluster.log(merge_job)
    _assert_equals_one_process(args, prefix, str(tmp_path / "single"))
