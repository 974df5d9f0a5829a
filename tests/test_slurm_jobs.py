"""The slurm/ scripts as users run them, under a real (one-node) Slurm on CPU tasks.

`sbatch slurm/stage1.sh` with the CPU smoke settings (docs/training.md, "Slurm"): 2 tasks, TP=2,
the tiny model converted in from a tiny HF Llama. Preemption the ways Slurm delivers it: to the
batch shell (scancel --batch --signal=USR1, what #SBATCH --signal=B:USR1@300 does) and to every
process of the step (scancel --signal=TERM), mid-training and in the middle of a checkpoint
save; the job requeues itself and resumes, and the losses equal an uninterrupted run bit for
bit. Then the whole ProLong chain in miniature: stage 2, SFT, export to HF.
"""
import glob
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import torch

from slurm_cluster import CPU_SBATCH, FINAL_STATES, HANG_S, REPO

pytestmark = pytest.mark.slow

STEPS = 8  # examples/smoke/stage1_cpu.yaml


@dataclass
class Smoke:
    root: str
    hf: str  # the tiny HF Llama the chain starts from
    mcore: str  # ... converted in (RoPE base 8M)
    stage1: str  # the uninterrupted stage-1 run
    losses: dict  # its per-step losses: the reference


def metrics_losses(run_dir) -> dict:
    """step -> loss from metrics.jsonl (the float as written: a bit-exact comparison)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def tiny_hf_llama(directory: str) -> None:
    """A random HF Llama of the `tiny` preset's shape (vocabulary = the byte tokenizer's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_prolong.config import MODEL_PRESETS

    t = MODEL_PRESETS["tiny"]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
        intermediate_size=t["ffn_hidden_size"], num_hidden_layers=t["num_layers"],
        num_attention_heads=t["num_attention_heads"], num_key_value_heads=t["num_query_groups"],
        rope_theta=t["rotary_base"], max_position_embeddings=t["max_position_embeddings"],
        rms_norm_eps=t["norm_epsilon"], tie_word_embeddings=False, bos_token_id=256,
        eos_token_id=257)
    LlamaForCausalLM(config).save_pretrained(directory)


def run_tool(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=HANG_S)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def training_env(recipe: str, run_dir, **variables) -> dict:
    """The documented CPU smoke-test variables (docs/training.md, "Slurm")."""
    return {"DEVICE": "cpu", "TASKS_PER_NODE": "2", "RECIPE": recipe, "TOKENIZER": "",
            "RUN_DIR": str(run_dir), "OMP_NUM_THREADS": "1", "EXTRA_OVERRIDES": "",
            **{k: str(v) for k, v in variables.items()}}


def stage1_env(smoke_or_mcore, run_dir, extra: str = "") -> dict:
    mcore = getattr(smoke_or_mcore, "mcore", smoke_or_mcore)
    return training_env("examples/smoke/stage1_cpu.yaml", run_dir, INIT_CKPT=mcore,
                        EXTRA_OVERRIDES=extra)


def run_job(cluster, script: str, env: dict, log_dir, options=CPU_SBATCH) -> tuple[int, str]:
    job = cluster.sbatch(script, list(options), env, str(log_dir))
    info = cluster.wait_done(job)
    log = cluster.log(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-5000:]
    return job, log


@pytest.fixture(scope="module")
def smoke(slurm_cluster, tmp_path_factory) -> Smoke:
    """A tiny HF Llama converted in with RoPE base 8M, then `sbatch slurm/stage1.sh` on 2 CPU
    tasks (TP=2), uninterrupted: the reference run of the preemption tests, stage 1 of the
    chain."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("the smoke tests run 2 CPU tasks: this machine has one core")
    root = tmp_path_factory.mktemp("slurm_smoke")
    hf, mcore, stage1 = str(root / "tiny-hf"), str(root / "tiny-mcore"), root / "stage1"
    tiny_hf_llama(hf)
    run_tool("tools/convert.py", "hf-to-mcore", "--hf-dir", hf, "--out", mcore,
             "--rope-theta", "8e6")
    _, log = run_job(slurm_cluster, "slurm/stage1.sh", stage1_env(mcore, stage1), root / "logs")
    assert "on 1 node(s) x 2 CPU processes = 2 processes" in log  # the dry run names the device
    assert f"initialised weights from {mcore}" in log
    assert "layout TP=2 PP=1 CP=1 DP=1" in log
    return Smoke(str(root), hf, mcore, str(stage1), metrics_losses(stage1))


def test_sbatch_stage1_on_two_cpu_tasks_trains_and_checkpoints(smoke):
    assert sorted(smoke.losses) == list(range(1, STEPS + 1))
    assert smoke.losses[STEPS] < smoke.losses[1]
    checkpoints = os.path.join(smoke.stage1, "checkpoints")
    assert open(os.path.join(checkpoints, "latest")).read().strip() == f"step_{STEPS:08d}"
    with open(os.path.join(checkpoints, f"step_{STEPS:08d}", "train_state.json")) as f:
        state = json.load(f)
    assert (state["step"], state["layout"]["tp"], state["layout"]["world_size"]) == (STEPS, 2, 2)
    assert not os.path.exists(os.path.join(smoke.stage1, "preempted"))


def _wait_for_file(pattern: str, deadline: float) -> str:
    while time.time() < deadline:
        found = glob.glob(pattern)
        if found:
            return found[0]
        time.sleep(0.01)
    raise AssertionError(f"nothing matched {pattern}")


def _preempt_and_resume(cluster, smoke, tmp_path, extra: str, wait_until, sig: str,
                        batch: bool) -> tuple[str, dict]:
    """Submit stage 1, signal it when `wait_until(run_dir, deadline)` returns, let the
    requeued job run, and return its log and the run's losses."""
    run_dir = tmp_path / "run"
    job = cluster.sbatch("slurm/stage1.sh", CPU_SBATCH, stage1_env(smoke, run_dir, extra),
                         str(tmp_path / "logs"))
    wait_until(str(run_dir), time.time() + HANG_S)
    cluster.signal(job, sig, batch=batch)
    signalled = time.time()
    info = cluster.wait_requeued(job)
    requeued = time.time()
    # Requeued, and not finished: waiting to start again or already running again.
    assert info["Restarts"] == "1" and info["JobState"] not in FINAL_STATES, (
        f"{info['JobState']}: not requeued\n{cluster.log(job)[-5000:]}")
    info = cluster.wait_done(job)
    log = cluster.log(job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    print(f"\n{sig} -> requeued {requeued - signalled:.1f}s -> done {time.time() - requeued:.1f}s")
    return log, metrics_losses(run_dir)


def _failures(log: str) -> list:
    return [w for w in ("Traceback", "BrokenPipeError", "EOFError") if w in log]


def test_preemption_mid_training_requeues_and_resumes_bit_exact(slurm_cluster, smoke, tmp_path):
    """scancel --batch --signal=USR1 (#SBATCH --signal=B:USR1@300): the batch shell forwards
    it to the step; srun delivers it to every process of the step, the checkpoint writer's
    helpers included (they used to die of it, and the save with them)."""
    def after_step_2(run_dir, deadline):
        path = os.path.join(run_dir, "metrics.jsonl")
        while not (os.path.exists(path) and len(open(path).readlines()) >= 2):
            assert time.time() < deadline, "the job did not reach step 2"
            time.sleep(0.05)

    # save_interval=2: the checkpoint writer's helper processes exist when the signal comes.
    log, losses = _preempt_and_resume(slurm_cluster, smoke, tmp_path,
                                      "checkpoint.save_interval=2", after_step_2, "USR1", True)
    assert "preemption signal: forwarding SIGUSR1 to the training ranks" in log
    stopped = [line for line in log.splitlines() if "(preempted); relaunch" in line]
    assert len(stopped) == 1 and not _failures(log), log
    assert "requeueing job" in log and "resuming from" in log
    assert losses == smoke.losses  # bit for bit


def test_sigterm_to_every_process_mid_save_requeues_and_resumes_bit_exact(
        slurm_cluster, smoke, tmp_path):
    """scancel --signal=TERM: Slurm signals every process of the step directly (the batch
    shell is not told), while a periodic checkpoint is being written. The save completes, the
    run stops after the next step, and the job requeues on the run's `preempted` marker."""
    def during_a_save(run_dir, deadline):
        # The step-3 save has begun; the writer's manager exists since the step-1 save.
        _wait_for_file(os.path.join(run_dir, "checkpoints", ".tmp-step_00000003"), deadline)

    log, losses = _preempt_and_resume(slurm_cluster, smoke, tmp_path,
                                      "checkpoint.save_interval=1", during_a_save, "TERM", False)
    assert "SIGTERM arrived during this save, which completed" in log, log
    assert "preemption signal" not in log  # the batch shell was not signalled...
    assert "requeueing job" in log  # ...and requeued on the marker
    assert not _failures(log), log
    assert losses == smoke.losses  # bit for bit


def test_scancel_saves_and_the_job_stays_cancelled(slurm_cluster, smoke, tmp_path):
    """`scancel JOB` (SIGTERM to everything, then SIGKILL after KillWait) is not a preemption:
    the ranks save within KillWait, and the script does not requeue the cancelled job."""
    run_dir = tmp_path / "run"
    job = slurm_cluster.sbatch("slurm/stage1.sh", CPU_SBATCH,
                               stage1_env(smoke, run_dir, "training.train_steps=1000"),
                               str(tmp_path / "logs"))
    path = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + HANG_S
    while not (os.path.exists(path) and len(open(path).readlines()) >= 2):
        assert time.time() < deadline, slurm_cluster.log(job)
        time.sleep(0.05)
    slurm_cluster.run("scancel", str(job))
    # The batch script's decision, then the settled state (it requeues, if at all, before it
    # exits, and the job leaves COMPLETING only after the script has exited).
    log = slurm_cluster.wait_for_log(job, "(cancelled): not requeueing")
    info = slurm_cluster.wait_done(job)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), log
    assert os.path.exists(run_dir / "checkpoints" / "latest"), log


def _rope_theta(config) -> float:
    # transformers 4.x: config.rope_theta; 5.x: config.rope_parameters["rope_theta"]
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    return float(theta)


CHATS = [
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": f"What is {a} plus {b}?"},
     {"role": "assistant", "content": f"{a + b}."},
     {"role": "user", "content": "And doubled?"},
     {"role": "assistant", "content": f"{2 * (a + b)}."}]
    for a in range(7) for b in range(5)
]


def test_prolong_chain_in_miniature_through_the_scripts(slurm_cluster, smoke, tmp_path):
    """HF -> stage 1 (8M, the fixture) -> stage 2 (512 tokens, 128M, weights + optimizer,
    schedule restarted) -> SFT (assistant-only loss) -> slurm/convert_to_hf.sh -> transformers."""
    logs = tmp_path / "logs"
    stage2, sft, export = tmp_path / "stage2", tmp_path / "sft", tmp_path / "export"
    stage1_latest = os.path.join(smoke.stage1, "checkpoints", f"step_{STEPS:08d}")

    _, log = run_job(slurm_cluster, "slurm/stage2.sh",
                     training_env("examples/smoke/stage2_cpu.yaml", stage2,
                                  STAGE1_RUN=smoke.stage1), logs)
    assert (f"initialised weights + optimizer state from {stage1_latest}; LR schedule and data "
            "restart at step 0") in log, log
    assert "steps 0 -> 4" in log and "RoPE theta 128,000,000" in log
    assert "seq_length 512" in log

    sft_data = tmp_path / "sft_data"
    with open(tmp_path / "chat.jsonl", "w") as f:
        for messages in CHATS:
            f.write(json.dumps({"messages": messages}) + "\n")
    run_tool("tools/preprocess_data.py", "--input", str(tmp_path / "chat.jsonl"),
             "--output-prefix", str(sft_data / "chat"), "--tokenizer", "byte", "--sft", "--quiet")
    sft_env = training_env("examples/smoke/sft_cpu.yaml", sft, STAGE2_RUN=stage2,
                           SFT_DATA=sft_data)
    _, log = run_job(slurm_cluster, "slurm/sft.sh", sft_env, logs)
    stage2_latest = os.path.join(stage2, "checkpoints", "step_00000004")
    assert (f"initialised weights from {stage2_latest}; LR schedule and data restart at step 0"
            in log), log
    # Assistant-only loss: the run counted exactly the loss-mask tokens of its first batch.
    first_step = _first_sft_step_tokens(sft_env)
    with open(sft / "metrics.jsonl") as f:
        logged = json.loads(f.readline())["loss_tokens"]
    assert logged == first_step["assistant"] < first_step["all"] / 4, (logged, first_step)

    _, log = run_job(slurm_cluster, "slurm/convert_to_hf.sh",
                     {"RUN_DIR": str(sft), "OUT": str(export), "TOKENIZER_DIR": "",
                      "DTYPE": "fp32", "HF_CONFIG": os.path.join(smoke.hf, "config.json")},
                     logs, options=["--partition=cpu", "--cpus-per-task=1", "--mem=4G",
                                    "--time=30"])
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(export), torch_dtype=torch.float32).eval()
    assert _rope_theta(model.config) == 128e6
    original = LlamaForCausalLM.from_pretrained(smoke.hf, torch_dtype=torch.float32)
    trained = model.state_dict()
    assert all(torch.isfinite(t).all() for t in trained.values())
    changed = [n for n, t in original.state_dict().items() if not torch.equal(t, trained[n])]
    assert len(changed) == len(trained), "every tensor was trained by the three stages"
    with torch.no_grad():
        logits = model(torch.tensor([list(b"What is 2 plus 3?")])).logits
    assert torch.isfinite(logits).all()


def _first_sft_step_tokens(env: dict) -> dict:
    """Loss tokens vs all tokens of the SFT run's first global batch, from its data source."""
    from megatron_prolong.config import load_config, validate
    from megatron_prolong.training.data_source import build_data_source

    old = os.environ.get("SFT_DATA")
    os.environ["SFT_DATA"] = env["SFT_DATA"]
    try:
        cfg = load_config(os.path.join(REPO, env["RECIPE"]), [f"run_dir={env['RUN_DIR']}"])
        layout = validate(cfg, 2)
        cwd = os.getcwd()
        os.chdir(REPO)  # the recipe names its mixture relative to the repository root
        try:
            batches = build_data_source(cfg, layout, dp_rank=0, rank=0).next_step()
        finally:
            os.chdir(cwd)
    finally:
        if old is None:
            os.environ.pop("SFT_DATA")
        else:
            os.environ["SFT_DATA"] = old
    return {"assistant": sum(int(b["num_loss_tokens"]) for b in batches),
            "all": sum(b["tokens"].numel() for b in batches)}
