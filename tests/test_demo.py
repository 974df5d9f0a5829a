"""The README's demo, shortened: corpus -> tokens -> packed rows -> training -> checkpoint + logs,
on one process and on 4 processes with TP=2 x PP=2."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ["training.seq_length=1024", "training.train_steps=12", "logging.log_interval=1",
         "checkpoint.save_interval=6", "optimizer.lr=5e-3"]


def _run(cmd, run_dir, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd + ["examples/demo_cpu.yaml", f"run_dir={run_dir}", *SHORT, *extra],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _check_run_dir(run_dir):
    losses = [json.loads(line)["loss"] for line in open(run_dir / "metrics.jsonl")]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses  # the loss falls
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000012"
    assert (run_dir / "checkpoints" / "step_00000006").is_dir()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir / "tensorboard"))
    assert (run_dir / "config.yaml").exists()
    assert sorted(os.listdir(run_dir / "demo_corpus")) == [
        f"{d}.{ext}" for d in ("code", "recall", "text") for ext in ("bin", "idx")]
    return losses


@pytest.mark.slow
def test_demo_single_process(tmp_path):
    stdout = _run([sys.executable, "-m", "megatron_prolong.train"], tmp_path / "run")
    assert "step 12/12" in stdout
    _check_run_dir(tmp_path / "run")


@pytest.mark.slow
def test_demo_tp2_pp2_on_four_processes(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "4", "-m", "megatron_prolong.train"]
    stdout = _run(torchrun, tmp_path / "run", "parallel.tensor=2", "parallel.pipeline=2")
    assert "TP=2 PP=2" in stdout
    _check_run_dir(tmp_path / "run")
