"""The README's demo, shortened: corpus -> tokens -> packed rows -> training -> checkpoint + logs
-> evaluation (held-out validation, recall), on one process and on 4 processes with TP=2 x PP=2;
then tools/evaluate.py on the run reproduces the in-training evaluation."""
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
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    losses = [r["loss"] for r in records if "eval" not in r]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses  # the loss falls
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000012"
    assert (run_dir / "checkpoints" / "step_00000006").is_dir()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir / "tensorboard"))
    assert (run_dir / "config.yaml").exists()
    evals = [r for r in records if "eval" in r]  # evaluation.interval=20: the last step only
    assert [r["step"] for r in evals] == [12]
    e = evals[0]["eval"]
    assert set(e["val_domain_loss"]) == {"code", "recall", "text"} and e["val_loss"] < losses[0]
    cells = e["recall"]["cells"]
    assert {(c["task"], c["length"]) for c in cells} == {("json_kv", 1024), ("niah_mk", 1024)}
    assert sorted(os.listdir(run_dir / "eval")) == ["recall_heatmap.png", "step_00000012.json"]
    assert sorted(os.listdir(run_dir / "demo_corpus")) == [
        f"{d}.{ext}" for d in ("code", "recall", "text") for ext in ("bin", "idx")]
    return losses


@pytest.mark.slow
def test_demo_single_process(tmp_path):
    stdout = _run([sys.executable, "-m", "megatron_prolong.train"], tmp_path / "run")
    assert "step 12/12" in stdout and "eval step 12 | val loss" in stdout
    assert "recall at step 12" in stdout  # the table
    _check_run_dir(tmp_path / "run")
    # The tool on the run directory scores the same examples and rows: the same numbers.
    tool = subprocess.run([sys.executable, "tools/evaluate.py", "--checkpoint", str(tmp_path / "run"),
                           "--validation", "--out", str(tmp_path / "tool")], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert tool.returncode == 0, tool.stdout[-3000:] + tool.stderr[-3000:]
    trained = json.load(open(tmp_path / "run" / "eval" / "step_00000012.json"))
    evaluated = json.load(open(tmp_path / "tool" / "results.json"))
    assert evaluated["eval"]["val_loss"] == pytest.approx(trained["eval"]["val_loss"], rel=1e-9)
    assert [e["mean_logprob"] for e in evaluated["examples"]] == pytest.approx(
        [e["mean_logprob"] for e in trained["examples"]], rel=1e-9)


@pytest.mark.slow
def test_demo_tp2_pp2_on_four_processes(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "4", "-m", "megatron_prolong.train"]
    stdout = _run(torchrun, tmp_path / "run", "parallel.tensor=2", "parallel.pipeline=2")
    assert "TP=2 PP=2" in stdout
    _check_run_dir(tmp_path / "run")
