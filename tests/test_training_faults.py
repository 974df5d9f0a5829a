"""The fault table of docs/training.md, one test per row: what goes wrong in a week-long run and
what the project does about it, driven through `python -m megatron_prolong.train` where a user
would meet it."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from distributed import _free_port, run_distributed
from training_cases import nan_gradient_cases

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cmd(run_dir, *extra):
    return [sys.executable, "-m", "megatron_prolong.train", "examples/demo_cpu.yaml",
            f"run_dir={run_dir}", "training.seq_length=256", "training.global_batch_size=2",
            "logging.log_interval=1", "logging.tensorboard=false",
            "evaluation.interval=0",  # evaluation has its own tests; recall needs longer rows
            *extra]


def _train(run_dir, *extra, timeout=900):  # timeouts in this file bound a hang only
    return subprocess.run(_cmd(run_dir, *extra), cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def _error_lines(proc):
    """The `error:` lines; a user-facing failure has exactly one and no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def _strict_records(path):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")
    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


# ---------------------------------------------------------------------------------- item 1
@pytest.fixture(scope="module")
def nan_gradients(tmp_path_factory):
    return run_distributed(nan_gradient_cases, 2, str(tmp_path_factory.mktemp("nan_grad")))


@pytest.mark.slow
def test_non_finite_gradient_with_finite_loss_is_skipped(nan_gradients):
    for rank, r in enumerate(nan_gradients):  # the poison was on rank 1 only
        results, checksums = r["skipped"]
        assert all(math.isfinite(results[s][0]) for s in range(1, 7)), results
        assert [results[s][2] for s in range(1, 7)] == [False, True, True, False, False, False]
        assert math.isnan(results[2][1]) and math.isinf(results[3][1])
        assert checksums[1] == checksums[2] == checksums[3], (rank, "no update on a skip")
        assert checksums[4] != checksums[3]


@pytest.mark.slow
def test_skipped_gradient_steps_are_counted_and_logged_as_strict_json(nan_gradients):
    root = nan_gradients[0]["root"]
    records = _strict_records(os.path.join(root, "skipped", "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["skipped"] for r in records] == [False, True, True, False, False, False]
    assert records[1]["grad_norm"] is None and records[2]["grad_norm"] is None  # NaN, Inf
    assert [r["skipped_total"] for r in records] == [0, 1, 2, 2, 2, 2]
    with open(os.path.join(root, "skipped", "checkpoints", "step_00000003",
                           "train_state.json")) as f:
        assert json.load(f)["skipped_steps"] == 2


@pytest.mark.slow
def test_divergence_names_a_checkpoint_with_finite_weights(nan_gradients):
    message, kept, latest, sums = nan_gradients[0]["diverged"]
    assert "2 skipped steps (non-finite loss or gradient) in a row" in message
    # keep_last=1: step 3 (skipped: the step-2 weights) replaced step 2 and is what remains.
    assert kept == ["latest", "step_00000003"] and latest == "step_00000003"
    assert "The last good checkpoint is" in message and message.count("step_00000003") == 1
    assert sums[2] == sums[3] and all(math.isfinite(v) for v in sums.values())


@pytest.mark.slow
def test_non_finite_weights_are_never_saved(nan_gradients):
    message, latest, finite = nan_gradients[0]["nan_weights"]
    assert "the weights are non-finite after step 3" in message
    assert latest == "step_00000002" and finite


# ---------------------------------------------------------------------------------- items 2, 4
def _frozen_between_saves(proc, run_dir, timeout=900):
    """SIGSTOP the run at a moment when it has logged steps after its latest checkpoint (a
    stopped process's files hold still, so the check is exact); returns that checkpoint."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended early"
        proc.send_signal(signal.SIGSTOP)
        try:
            latest = (run_dir / "checkpoints" / "latest").read_text().strip()
            logged = [r["step"] for r in _strict_records(run_dir / "metrics.jsonl")]
            if max(logged) > int(latest.split("_")[1]):
                return latest
        except (OSError, ValueError):
            pass
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.2)
    raise AssertionError("no step logged after a checkpoint")


@pytest.mark.slow
def test_one_owner_per_run_dir_and_metrics_cut_at_resume(tmp_path):
    run_dir = tmp_path / "run"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(_cmd(run_dir, "training.train_steps=200",
                                  "checkpoint.save_interval=3"),
                             cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        latest = _frozen_between_saves(first, run_dir)
        config_before = (run_dir / "config.yaml").read_bytes()

        # A second launch (a double sbatch, a requeue racing a relaunch) refuses at once,
        # even while the owner is stopped (suspended jobs still own their run directory).
        # (It cannot wait for the lock: the owner is stopped, _train's timeout would end it.)
        second = _train(run_dir, "training.train_steps=7")
        assert second.returncode == 2, second.stdout + second.stderr
        (line,) = _error_lines(second)
        assert f"is in use by pid {first.pid} on host " in line, line
        assert "running since" in line
        assert (run_dir / "config.yaml").read_bytes() == config_before
        assert first.poll() is None, "the owner is untouched"
    finally:
        first.kill()  # SIGKILL: no clean-up, no chance to release anything itself
        first.wait()
        log.close()
    assert first.returncode == -signal.SIGKILL

    # The kernel dropped the dead owner's lock: the next launch proceeds and resumes.
    resumed_at = int(latest.split("_")[1])
    logged = [r["step"] for r in _strict_records(run_dir / "metrics.jsonl")]
    assert max(logged) > resumed_at  # steps logged after the checkpoint, then lost
    third = _train(run_dir, "training.train_steps=200", f"training.exit_at_step={resumed_at + 2}")
    assert third.returncode == 0, third.stdout + third.stderr
    assert f"resuming from {run_dir / 'checkpoints' / latest}" in third.stdout
    # metrics.jsonl was cut at the resumed step: every step once, in order.
    steps = [r["step"] for r in _strict_records(run_dir / "metrics.jsonl")]
    assert steps == list(range(1, resumed_at + 3))
    with open(run_dir / "run.lock") as f:
        holder = json.load(f)
    assert holder["pid"] != first.pid and {"host", "slurm_job_id", "started"} <= set(holder)


def test_run_dir_lock_covers_a_save_dir_inside_it_and_refuses_a_second_owner(tmp_path):
    from megatron_prolong.config import load_config
    from megatron_prolong.training.loop import lock_run_dirs, release_locks
    from megatron_prolong.training.run_lock import RunDirBusy

    run_dir = tmp_path / "run"
    expected = {f"{run_dir}/": [run_dir], str(run_dir / "ckpt"): [run_dir],
                str(tmp_path / "elsewhere"): [run_dir, tmp_path / "elsewhere"]}
    for save_dir, locked in expected.items():
        cfg = load_config(None, [f"run_dir={run_dir}", f"checkpoint.save_dir={save_dir}"])
        locks = lock_run_dirs(cfg, rank=0)
        try:
            assert [lock.directory for lock in locks] == [str(d) for d in locked], save_dir
            with pytest.raises(RunDirBusy, match=f"is in use by pid {os.getpid()}"):
                lock_run_dirs(cfg, rank=0)  # a second launch's rank 0
            assert lock_run_dirs(cfg, rank=1) == []  # the owner's other ranks take none
        finally:
            release_locks(locks)


# ---------------------------------------------------------------------------------- items 3, 5
@pytest.mark.slow
def test_changed_model_shape_and_dangling_latest(tmp_path):
    run_dir = tmp_path / "run"
    first = _train(run_dir, "training.train_steps=2", "checkpoint.save_interval=1",
                   "checkpoint.keep_last=2")
    assert first.returncode == 0, first.stdout + first.stderr
    config_before = (run_dir / "config.yaml").read_bytes()
    stored = yaml.safe_load((run_dir / "checkpoints" / "step_00000002" / "config.yaml").read_text())
    assert stored["model"]["num_layers"] == 4 and stored["model"]["hidden_size"] == 128

    # Relaunching with another shape is refused before anything is touched.
    changed = _train(run_dir, "training.train_steps=3", "model.num_layers=2",
                     "model.ffn_hidden_size=256", "model.rotary_base=1e6")
    assert changed.returncode == 2, changed.stdout + changed.stderr
    (line,) = _error_lines(changed)
    assert ("step_00000002 holds a model with model.num_layers=4, model.ffn_hidden_size=352; "
            "this config has model.num_layers=2, model.ffn_hidden_size=256") in line, line
    assert "rotary_base" not in line  # not a shape: stage 2 changes it on purpose
    assert (run_dir / "config.yaml").read_bytes() == config_before

    # The checkpoint converts to HF with the shape stored beside it, even where the run's own
    # config.yaml no longer matches (as launches before this check left it).
    (run_dir / "config.yaml").write_text(
        config_before.decode().replace("num_layers: 4", "num_layers: 2"))
    out = subprocess.run([sys.executable, "tools/convert.py", "mcore-to-hf", "--checkpoint",
                          str(run_dir), "--out", str(tmp_path / "hf")], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_hidden_layers"] == 4
    (run_dir / "config.yaml").write_bytes(config_before)

    # `latest` names a deleted step: the newest whole checkpoint is used, and the user told.
    import shutil

    shutil.rmtree(run_dir / "checkpoints" / "step_00000002")
    again = _train(run_dir, "training.train_steps=3")
    assert again.returncode == 0, again.stdout + again.stderr
    step1 = run_dir / "checkpoints" / "step_00000001"
    assert (f"latest names step_00000002, which is missing or incomplete; using the newest "
            f"complete checkpoint {step1} instead") in again.stderr
    assert f"resuming from {step1}" in again.stdout
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"


def test_latest_fallback_rules(tmp_path):
    from megatron_prolong.training.checkpoint import CheckpointError, resolve_checkpoint

    save = tmp_path / "checkpoints"

    def step(n, whole=True):
        d = save / f"step_{n:08d}"
        (d / "dist").mkdir(parents=True)
        (d / "train_state.json").write_text(json.dumps({"step": n}) if whole else "{trunc")
        (d / "dist" / "metadata.json").write_text("{}")
        return str(d)
    s1, s2, s3 = step(1), step(2), step(3, whole=False)
    (save / "latest").write_text("step_00000002\n")
    assert resolve_checkpoint(str(tmp_path)) == s2  # a good pointer is followed
    (save / "latest").write_text("step_00000003\n")
    assert resolve_checkpoint(str(tmp_path)) == s2  # damaged train_state.json: fall back
    os.remove(save / "latest")
    assert resolve_checkpoint(str(tmp_path)) == s2  # no pointer but checkpoints: not scratch
    with pytest.raises(CheckpointError, match="is not a complete checkpoint"):
        resolve_checkpoint(s3)  # a step named directly is not silently swapped
    for d in (s1, s2):
        os.remove(os.path.join(d, "dist", "metadata.json"))
    (save / "latest").write_text("step_00000002\n")
    with pytest.raises(CheckpointError, match="no other complete step_\\* checkpoint"):
        resolve_checkpoint(str(tmp_path))


# ---------------------------------------------------------------------------------- item 7
@pytest.mark.parametrize("override,field", [
    ("training.micro_batch_size=0", "training.micro_batch_size=0: must be >= 1"),
    ("training.global_batch_size=0", "training.global_batch_size=0: must be >= 1"),
    ("training.seq_length=0", "training.seq_length=0: must be >= 1"),
    ("optimizer.lr=-0.001", "optimizer.lr=-0.001: must be > 0"),
    ("training.train_steps=-1",
     "training.train_steps=-1: must be >= 1 (or set training.train_tokens)"),
    ("model.num_attention_heads=0", "model.num_attention_heads=0: must be >= 1"),
])
def test_non_positive_fields_are_refused_before_anything_is_built(tmp_path, override, field):
    out = _train(tmp_path / "run", override)
    assert out.returncode == 2, out.stdout + out.stderr
    assert _error_lines(out) == [f"error: invalid configuration: {field}"]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("override,needle", [
    ("data.kind=synthetic checkpoint.load={tmp}/no_such_checkpoint",
     "error: no checkpoint at {tmp}/no_such_checkpoint"),
    ("data.kind=mixture data.mixture={tmp}/no_such_mixture.yaml",
     "error: data.mixture={tmp}/no_such_mixture.yaml: no such file"),
])
def test_input_errors_after_start_up_are_one_line_exit_2(tmp_path, override, needle):
    out = _train(tmp_path / "run", *override.format(tmp=tmp_path).split())
    assert out.returncode == 2, out.stdout + out.stderr
    (line,) = _error_lines(out)
    assert line.startswith(needle.format(tmp=tmp_path)), line
    assert not (tmp_path / "run").exists()  # no run.lock, config.yaml or corpus left behind


def test_unreadable_validation_data_is_a_config_error_naming_the_setting(tmp_path):
    """What periodic evaluation reads before step 1 (train.py turns it into one line, exit 2)."""
    from megatron_prolong.config import ConfigError, load_config
    from megatron_prolong.training.data_source import build_validation_samples

    missing = tmp_path / "no_such_val.yaml"
    mixture = tmp_path / "val.yaml"
    mixture.write_text(yaml.safe_dump({"domains": [
        {"name": "x", "paths": [str(tmp_path / "no_such_dataset")], "proportion": 1.0}]}))
    for path in (missing, mixture):
        cfg = load_config(None, ["data.kind=mixture", f"data.mixture={tmp_path / 'train.yaml'}",
                                 f"evaluation.validation_mixture={path}"])
        with pytest.raises(ConfigError, match=f"^evaluation.validation_mixture={path}: "):
            build_validation_samples(cfg, None)


def test_recall_too_long_for_the_rows_stops_at_start(tmp_path):
    """Evaluation settings that cannot be met (recall at 256 tokens: the task's fixed text is
    longer) stop the run before step 1 with one line, not with a traceback at the first
    evaluation."""
    out = _train(tmp_path / "run", "evaluation.interval=1")
    assert out.returncode == 2, out.stdout + out.stderr
    (line,) = _error_lines(out)
    assert line.startswith("error: evaluation.recall_lengths (unset: training.seq_length)=[256]: "
                           "256 tokens is too short"), line
    assert "step 1" not in out.stdout


def _write_dataset(prefix, docs, vocab_size=512):
    from megatron_prolong.data.indexed import IndexedWriter

    with IndexedWriter(prefix, vocab_size) as w:
        for doc in docs:
            w.add(np.asarray(doc))
    return prefix


@pytest.mark.slow
def test_bad_token_id_in_a_late_document_and_rescaled_mixture(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, 300) for _ in range(400)]
    good = _write_dataset(str(tmp_path / "data" / "good"), docs)
    late = _write_dataset(str(tmp_path / "data" / "late"),
                          docs[:390] + [np.r_[docs[390][:100], 700, docs[390][100:]]] + docs[391:],
                          vocab_size=1024)
    mixture = tmp_path / "mix.yaml"
    mixture.write_text(yaml.safe_dump({"domains": [
        {"name": "prose", "paths": [good], "proportion": 3},
        {"name": "code", "paths": [late], "proportion": 1}]}))
    out = _train(tmp_path / "run", "data.kind=mixture", f"data.mixture={mixture}",
                 "training.train_steps=2")
    assert out.returncode == 2, out.stdout + out.stderr
    (line,) = _error_lines(out)
    assert line == (f"error: data.mixture={mixture}: {late}: sequence 390 (of 400) holds token "
                    "id 700, outside the vocabulary [0, 512); the data was tokenized with a "
                    "different tokenizer than the one configured")
    assert "step 1/" not in out.stdout  # found at start, not when the sampler got there
    # Proportions are relative weights: the shares actually used are printed.
    assert "data mixture: the proportions sum to 4, not 1" in out.stdout
    table = out.stdout.split("data mixture:", 1)[1].splitlines()[1:3]
    assert [row.split() for row in table] == [["prose", "3", "->", "75.00%"],
                                              ["code", "1", "->", "25.00%"]]


def test_max_token_id_is_cached_per_file_and_rescanned_when_it_changes(tmp_path):
    from megatron_prolong.data.max_token_id import CACHE_SUFFIX, check_token_ids, max_token_id

    prefix = _write_dataset(str(tmp_path / "d"), [[1, 2, 3], [4, 300]])
    assert max_token_id(prefix) == 300
    with open(prefix + CACHE_SUFFIX) as f:
        assert json.load(f)["max_token_id"] == 300
    check_token_ids(prefix, 512)
    before = os.stat(prefix + ".bin")
    _write_dataset(prefix, [[1, 2, 3], [4, 500]])  # rewritten in place, the same size
    # A rewrite lands at a later mtime; within one clock tick (coarse, a few ms) the kernel
    # may give it the same one, so the test sets a later one rather than sleeping for it.
    os.utime(prefix + ".bin", ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    assert max_token_id(prefix) == 500
    from megatron_prolong.data.indexed import DataFileError

    with pytest.raises(DataFileError, match=r"sequence 1 \(of 2\) holds token id 500"):
        check_token_ids(prefix, 400)
    # A signed dtype cannot smuggle a negative id past the check.
    neg = _write_dataset(str(tmp_path / "n"), [[5, -3, 2]], vocab_size=200_000)
    with pytest.raises(DataFileError, match="holds token id -3"):
        check_token_ids(neg, 200_000)


@pytest.mark.slow
def test_start_up_error_on_two_ranks_exits_2_everywhere(tmp_path):
    """A failure one rank finds (rank 0 scans the token ids) ends every rank by itself, as
    srun without --kill-on-bad-exit needs, with exit 2 and one line."""
    bad = _write_dataset(str(tmp_path / "bad"), [[1, 2, 999]], vocab_size=1024)
    mixture = tmp_path / "mix.yaml"
    mixture.write_text(yaml.safe_dump({"domains": [{"name": "x", "paths": [bad],
                                                    "proportion": 1.0}]}))
    cmd = _cmd(tmp_path / "run", "data.kind=mixture", f"data.mixture={mixture}",
               "parallel.tensor=2", "training.train_steps=2")
    port = str(_free_port())
    ranks = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r),
                                              "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                              "MASTER_PORT": port})
             for r in range(2)]
    try:
        outs = [p.communicate(timeout=900) for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    assert [p.returncode for p in ranks] == [2, 2], outs
    errors = [line for _, err in outs for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "holds token id 999" in errors[0], outs
    assert not any("Traceback" in err for _, err in outs)
