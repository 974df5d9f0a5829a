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
    """Refused after start-up (the demo corpus built, config.yaml and run.lock written): the
    launch removes what it wrote and restores the config.yaml an earlier launch left."""
    (tmp_path / "config.yaml").write_text("# an earlier launch's\n")
    (tmp_path / "notes.txt").write_text("mine\n")
    # The demo's byte tokenizer has 512 ids; a 1024-row embedding means the wrong tokenizer.
    out = subprocess.run(_cmd(tmp_path, "model.vocab_size=1024"), cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "data.tokenizer='byte' vs model.vocab_size=1024" in out.stderr
    assert sorted(os.listdir(tmp_path)) == ["config.yaml", "notes.txt"]
    assert (tmp_path / "config.yaml").read_text() == "# an earlier launch's\n"


def test_a_launch_refused_at_start_up_removes_the_folders_it_created(tmp_path):
    from megatron_prolong.config import load_config
    from megatron_prolong.training.launch_footprint import LaunchFootprint

    cfg = load_config(None, [f"run_dir={tmp_path / 'runs' / 'new'}", "data.kind=demo",
                             f"data.options.corpus_dir={tmp_path / 'corpus'}"])
    (tmp_path / "corpus").mkdir()  # an earlier run's corpus, shared
    footprint = LaunchFootprint.take(cfg)
    for d in ("runs/new/checkpoints", "runs/new/demo_corpus", "corpus/code.bin.tmp"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "runs" / "new" / "config.yaml").write_text("x")
    assert footprint.remove_created()
    assert sorted(os.listdir(tmp_path)) == ["corpus"]  # runs/ was this launch's, corpus/ not
    # a launch that logged a step keeps everything
    footprint = LaunchFootprint.take(cfg)
    (tmp_path / "runs" / "new").mkdir(parents=True)
    (tmp_path / "runs" / "new" / "metrics.jsonl").write_text('{"step": 1}\n')
    assert not footprint.remove_created()
    assert (tmp_path / "runs" / "new" / "metrics.jsonl").exists()


# Runs train.main in a fresh interpreter, then says whether torch or megatron-core was imported.
PROBE = ("import sys\nfrom megatron_prolong.train import main\nrc = main(sys.argv[1:])\n"
         "print('heavy imports:', sorted(m for m in ('torch', 'megatron') if m in sys.modules))\n"
         "sys.exit(rc)\n")


def _mixture(tmp_path, text):
    path = tmp_path / "mixture.yaml"
    path.write_text(text)
    return f"data.mixture={path}"


@pytest.mark.parametrize("overrides,needle", [
    (["training.train_step=10"], "error: override training.train_step=10: training.train_step: "
     "unknown field; did you mean training.train_steps?"),
    (["training.train_steps=!!python/object/apply:os.system [echo hacked]"],
     "error: override training.train_steps=!!python/object/apply:os.system [echo hacked]: not a "
     "valid YAML value: could not determine a constructor"),
    (["data.kind=mixture", "data.mixture={tmp}/none.yaml"],
     "error: data.mixture={tmp}/none.yaml: no such file"),
    (["data.kind=mixture", "mixture:domains: [{name: a, paths: ['${I20_UNSET}/a'], proportion: 1}]"],
     "error: data.mixture={tmp}/mixture.yaml: path '${I20_UNSET}/a': placeholder ${I20_UNSET} "
     "is not set; export I20_UNSET=..."),
    (["data.kind=mixture", "mixture:domains: [{name: a, paths: ['{tmp}/a'], proportion: 1}]"],
     "error: data.mixture={tmp}/mixture.yaml: domain 'a': {tmp}/a.bin and {tmp}/a.idx not found"),
    (["data.kind=mixture", "mixture:domains: !!python/object/apply:os.system [echo hacked]"],
     "error: data.mixture={tmp}/mixture.yaml: {tmp}/mixture.yaml:1: not valid YAML: could not "
     "determine a constructor"),
])
def test_bad_input_fails_before_heavy_imports_and_writes_nothing(tmp_path, overrides, needle):
    args = [a.replace("{tmp}", str(tmp_path)) for a in overrides]
    args = [_mixture(tmp_path, a[len("mixture:"):]) if a.startswith("mixture:") else a
            for a in args]
    env = {k: v for k, v in os.environ.items() if k != "I20_UNSET"}
    out = subprocess.run([sys.executable, "-c", PROBE, "examples/demo_cpu.yaml",
                          f"run_dir={tmp_path / 'run'}", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    (line,) = out.stderr.splitlines()
    assert line.startswith(needle.replace("{tmp}", str(tmp_path))), line
    assert "heavy imports: []" in out.stdout  # torch and megatron-core were never loaded
    assert not (tmp_path / "run").exists()


def test_no_arguments_print_usage_and_train_nothing(tmp_path):
    out = subprocess.run([sys.executable, "-m", "megatron_prolong.train"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.startswith("usage: python -m megatron_prolong.train")
    assert "error: a recipe is required (e.g. examples/demo_cpu.yaml)" in out.stderr
    assert os.listdir(tmp_path) == []
    helped = subprocess.run([sys.executable, "-m", "megatron_prolong.train", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0
    assert "dry run: number of nodes" in helped.stdout
    assert "dry run: GPUs per node" in helped.stdout


def test_what_the_tools_write_by_default_is_ignored_by_git():
    """Outputs a first hour leaves in the checkout: runs, evaluation results, the set-up's."""
    if not os.path.exists(os.path.join(REPO, ".git")):
        pytest.skip("not a git checkout")
    paths = ["runs/demo_cpu/config.yaml", "eval_results/step_00000040/results.json",
             ".test-deps/streaming/streaming/__init__.py", ".setup-done"]
    out = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == paths, out.stdout + out.stderr
