"""The entry point as a cluster runs it: a real process, a real signal, a relaunch."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(run_dir, *extra):
    return [sys.executable, "-m", "megatron_prolong.train", "examples/demo_cpu.yaml",
            f"run_dir={run_dir}", "training.seq_length=512", "training.train_steps=100",
            "logging.log_interval=1", "checkpoint.save_interval=0",
            "evaluation.interval=0",  # recall needs longer rows than these
            *extra]


@pytest.mark.slow
def test_sigterm_saves_and_the_next_launch_resumes(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cmd(run_dir), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 300
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 2/100"):
            proc.send_signal(signal.SIGTERM)  # what Slurm (or the batch shell's trap) sends
            break
        assert time.time() < deadline, "".join(lines)
    rest, _ = proc.communicate(timeout=900)
    out = "".join(lines) + rest
    assert proc.returncode == 0, out
    assert "(preempted)" in out
    with open(run_dir / "checkpoints" / "latest") as f:
        latest = f.read().strip()
    stopped_at = int(latest.split("_")[1])
    assert stopped_at >= 2

    again = subprocess.run(_cmd(run_dir, f"training.exit_at_step={stopped_at + 2}"), cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming from {run_dir / 'checkpoints' / latest}" in again.stdout
    records = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(1, stopped_at + 3))
    assert set(records[-1]["domain_loss"]) <= {"code", "recall", "text"}
    assert records[-1]["domain_loss"], "per-domain losses are recorded"
    assert (run_dir / "config.yaml").exists()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir / "tensorboard"))


def test_bad_override_exits_2_with_the_field_name(tmp_path):
    out = subprocess.run(_cmd(tmp_path, "training.loss_chunk_size=-1"), cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 2
    assert "training.loss_chunk_size=-1" in out.stderr


def test_tokenizer_that_does_not_fit_the_model_is_refused(tmp_path):
    # The demo's byte tokenizer has 512 ids; a 1024-row embedding means the wrong tokenizer.
    out = subprocess.run(_cmd(tmp_path, "model.vocab_size=1024"), cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "data.tokenizer='byte' vs model.vocab_size=1024" in out.stderr
