"""Signals and start-up limits (issue 19): a preemption signal ends a step that is still
collecting its micro-batches, Ctrl-C saves and stops (a second one aborts at once), and a step
that cannot fit this machine is refused before anything is allocated."""
import os
import signal
import subprocess
import sys
import time

import pytest

from distributed import run_distributed
from training_signal_cases import GLOBAL_BATCH, signal_cases

from megatron_prolong.config import ConfigError, load_config, validate
from megatron_prolong.training.limits import GIB, Machine, check_start_up_limits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cmd(run_dir, *extra):
    return [sys.executable, "-m", "megatron_prolong.train", "examples/demo_cpu.yaml",
            f"run_dir={run_dir}", "training.seq_length=256", "training.global_batch_size=2",
            "logging.log_interval=1", "logging.tensorboard=false", "evaluation.interval=0",
            *extra]


# ------------------------------------------------------------------------- start-up limits
@pytest.mark.slow
@pytest.mark.parametrize("override, needle", [
    ("training.seq_length=1099511627776", "of host memory"),
    ("training.global_batch_size=1099511627776", "1,099,511,627,776 micro-batches per step"),
])
def test_absurd_step_sizes_are_refused_before_anything_is_allocated(tmp_path, override, needle):
    run_dir = tmp_path / "run"
    proc = subprocess.run(_cmd(run_dir, override), cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert override.split("=")[0] in line and needle in line, line
    assert not run_dir.exists(), "refused before the run directory is touched"


H100_NODE = Machine("cuda", int(79.6 * GIB), 2048 * GIB, 8)


def test_shipped_recipes_pass_and_a_step_too_big_for_the_gpu_is_refused():
    cfg = load_config("examples/stage1_64k.yaml")
    check_start_up_limits(cfg, validate(cfg, 64), H100_NODE)  # the recipe as shipped
    big = load_config("examples/stage1_64k.yaml", ["training.seq_length=4194304"])
    with pytest.raises(ConfigError, match=r"per GPU \(model.recompute=full\), more than 2 x "
                                          r"the 79.6 GiB of GPU memory"):
        check_start_up_limits(big, validate(big, 64), H100_NODE)
    # The batches of a step are collected in host memory, shared by the node's 8 ranks:
    # 65,536 micro-batches of 64K tokens per rank (the most allowed) need 1 TiB per node.
    many = load_config("examples/stage1_64k.yaml", ["training.global_batch_size=2097152"])
    small_host = Machine("cuda", int(79.6 * GIB), 256 * GIB, 8)
    with pytest.raises(ConfigError, match="the step's collected batches come to 1,024.0 GiB"):
        check_start_up_limits(many, validate(many, 64), small_host)


def test_recompute_auto_and_block_are_priced_as_megatron_will_run_them():
    """`model.recompute=auto` is checked at the least memory the planner could pick (full), and
    an explicit block plan by its own layers (the planner's settings, issue 18)."""
    H100 = Machine("cuda", int(79.6 * GIB), 1024 * GIB, 1)
    auto = load_config("examples/bench_64k_1gpu.yaml", ["model.recompute=auto"])
    check_start_up_limits(auto, validate(auto, 1), H100)
    block = load_config("examples/bench_64k_1gpu.yaml", [
        "model.recompute=full", "model.recompute_method=block", "model.recompute_num_layers=7"])
    check_start_up_limits(block, validate(block, 1), H100)
    too_big = load_config("examples/bench_64k_1gpu.yaml",
                          ["model.recompute=auto", "training.seq_length=2097152"])
    with pytest.raises(ConfigError, match=r"model.recompute=auto\), more than 2 x"):
        check_start_up_limits(too_big, validate(too_big, 1), H100)


def test_a_cpu_run_is_checked_against_host_memory_without_the_cuda_allowance():
    cfg = load_config("examples/demo_cpu.yaml", ["training.device=auto"])
    layout = validate(cfg, 4)
    check_start_up_limits(cfg, layout, Machine("cpu", None, 8 * GIB, 4))  # 4 tiny ranks, 8 GiB
    big = load_config("examples/demo_cpu.yaml", ["training.seq_length=4194304"])
    with pytest.raises(ConfigError, match=r"4 process\(es\) on this node.*more than 2 x the "
                                          r"8.0 GiB here"):
        check_start_up_limits(big, validate(big, 4), Machine("cpu", None, 8 * GIB, 4))


def test_the_dry_run_still_reports_a_recipe_that_does_not_fit():
    proc = subprocess.run([sys.executable, "-m", "megatron_prolong.train",
                           "examples/stage2_512k.yaml", "--dry-run", "--nodes", "8",
                           "model.recompute=none"], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 4 and "fits on H100 (79.6 GiB): NO" in proc.stdout


# --------------------------------------------------------------------------------- signals
@pytest.fixture(scope="module")
def signalled(tmp_path_factory):
    (result,) = run_distributed(signal_cases, 1, str(tmp_path_factory.mktemp("signals")))
    return result


@pytest.mark.slow
def test_sigterm_while_collecting_micro_batches_ends_the_step(signalled):
    reason, final_step, latest, consumed, fetched_for_step_2, marker = signalled["collecting"]
    assert (reason, final_step, latest) == ("preempted", 1, "step_00000001")
    assert consumed == GLOBAL_BATCH, "the given-up step consumed nothing: resume is exact"
    assert fetched_for_step_2 == 8, f"given up at the first agreed check, not after {GLOBAL_BATCH}"
    assert marker, "run_dir/preempted is left for the launcher"


@pytest.mark.slow
def test_first_ctrl_c_saves_and_stops(signalled):
    reason, final_step, latest, second_aborts = signalled["ctrl_c"]
    assert (reason, final_step, latest) == ("preempted", 2, "step_00000002")
    assert second_aborts, "after the first SIGINT the default action (abort) is back"


def _catches_sigterm(pid):
    with open(f"/proc/{pid}/status") as f:
        caught = next(int(ln.split()[1], 16) for ln in f if ln.startswith("SigCgt:"))
    return bool(caught >> (signal.SIGTERM - 1) & 1)


@pytest.mark.slow
def test_second_ctrl_c_aborts_at_once(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_cmd(run_dir, "training.train_steps=1000"), cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not _catches_sigterm(proc.pid):  # the flag is installed (SIGINT with it)
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        lines = []
        for line in proc.stderr:  # the first Ctrl-C says what it does and what a second does
            lines.append(line)
            if "press Ctrl-C again to abort at once" in line:
                break
        else:
            raise AssertionError("".join(lines))
        proc.send_signal(signal.SIGINT)  # during start-up: seconds before it could stop
        rest = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGINT, "".join(lines) + rest
    assert "Traceback" not in "".join(lines) + rest
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "preempted").exists()
