"""Bodies of the multi-process training-loop tests; run on every rank by tests/distributed.py."""
from __future__ import annotations

import contextlib
import os

import torch

BASE = ["model.preset=tiny", "training.seq_length=256", "training.global_batch_size=2",
        "training.train_steps=6", "data.kind=synthetic", "optimizer.lr=3e-3",
        "training.device=cpu", "training.precision=fp32", "logging.tensorboard=false",
        "training.loss_chunk_size=100", "checkpoint.keep_last=2"]


@contextlib.contextmanager
def _model_parallel(overrides):
    """(cfg, layout) of BASE + overrides, with megatron's parallel groups set up inside."""
    from megatron_prolong.config import load_config, validate
    from megatron_prolong.training.parallel import destroy_model_parallel, init_model_parallel

    cfg = load_config(None, BASE + overrides)
    layout = validate(cfg, torch.distributed.get_world_size())
    init_model_parallel(layout, cfg.training.seed)
    try:
        yield cfg, layout
    finally:
        destroy_model_parallel()


def run(overrides, **kwargs):
    """One training run in this (already initialised) process group."""
    from megatron_prolong.training.loop import train

    with _model_parallel(overrides) as (cfg, layout):
        return train(cfg, _runtime(), layout, **kwargs)


def _runtime():
    from megatron_prolong.training.parallel import init_distributed

    return init_distributed("cpu")


def _latest(run_dir):
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        return f.read().strip()


def _checksum(state):
    return sum(float(p.double().sum()) for p in state.model[0].parameters())


class NaNInjector:
    """Makes the model's output NaN at chosen steps (a forward hook on the final norm)."""

    def __init__(self, steps):
        self.steps, self.next_step, self.installed = set(steps), 1, False

    def __call__(self, step, result, state, batches):
        if not self.installed:
            norm = state.model[0].module.decoder.final_layernorm
            norm.register_forward_hook(
                lambda m, i, o: o * float("nan") if self.next_step in self.steps else o)
            self.installed = True
        self.next_step = step + 1


def single_process_cases(root):
    """Exact resume, preemption, atomic save and NaN handling on one CPU process."""
    import signal

    from megatron_prolong.training import checkpoint as ckpt_mod
    from megatron_prolong.training.loop import TrainingDiverged

    _runtime()
    out = {}
    d = lambda name: f"run_dir={os.path.join(root, name)}"  # noqa: E731
    weights_dir = os.path.join(root, "weights")

    def export_weights(step, result, state, batches):
        if step == 6:
            from megatron_prolong.training.weights import save_model_weights

            save_model_weights(state.model, weights_dir)
    out["straight"] = run([d("straight")], step_hook=export_weights).losses
    # A bare weights directory (what tools/convert.py hf-to-mcore writes) initialises a run.
    init = run([d("from_weights"), f"checkpoint.load={weights_dir}", "training.train_steps=1"])
    out["from_weights"] = (init.resumed_from, init.losses)

    # Stop after step 3 (as a time-limited job would), then relaunch: resumes at step 4.
    first = run([d("stopped"), "training.exit_at_step=3"])
    second = run([d("stopped")])
    out["stopped"] = (first.stop_reason, first.losses, second.resumed_from, second.losses)

    # Preemption: SIGUSR1 arrives during step 2; the run saves and exits cleanly.
    def preempt(step, *_):
        if step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
    first = run([d("preempted")], step_hook=preempt)
    latest_after = _latest(os.path.join(root, "preempted"))
    second = run([d("preempted")])
    out["preempted"] = (first.stop_reason, first.final_step, latest_after, second.losses)

    # A crash inside the save at step 4 leaves `latest` on step 2, which loads and resumes.
    original = ckpt_mod.CheckpointManager._write_rank_files

    def crash(self, tmp, progress):
        if progress.step == 4:
            raise OSError("simulated crash in the middle of writing a checkpoint")
        return original(self, tmp, progress)
    ckpt_mod.CheckpointManager._write_rank_files = crash
    try:
        run([d("crashed"), "checkpoint.save_interval=2"])
        crashed = "no crash"
    except OSError as exc:
        crashed = str(exc)
    finally:
        ckpt_mod.CheckpointManager._write_rank_files = original
    crash_dir = os.path.join(root, "crashed", "checkpoints")
    left = sorted(os.listdir(crash_dir))
    resumed = run([d("crashed"), "checkpoint.save_interval=2"])
    out["crashed"] = (crashed, left, resumed.resumed_from, resumed.losses,
                      sorted(os.listdir(crash_dir)))

    # NaN at steps 2-3: skipped and counted, weights untouched, training goes on.
    checksums = {}
    injector = NaNInjector({2, 3})

    def record(step, result, state, batches):
        injector(step, result, state, batches)
        checksums[step] = _checksum(state)
    skipped = run([d("nan"), "training.max_nan_steps=3"], step_hook=record)
    out["nan"] = (skipped.losses, checksums)

    # NaN from step 3 on with max_nan_steps=2: stops at step 4, keeps the step-2 checkpoint.
    try:
        run([d("diverged"), "training.max_nan_steps=2", "checkpoint.save_interval=1"],
            step_hook=NaNInjector({3, 4, 5, 6}))
        out["diverged"] = ("no error", None)
    except TrainingDiverged as exc:
        out["diverged"] = (str(exc), _latest(os.path.join(root, "diverged")))
    return out


def resharding_cases(root):
    """Save at TP2 x PP2, continue at TP1 (DP=4): same losses; stage-2 style reset_schedule."""
    _runtime()
    src = os.path.join(root, "tp2pp2")
    four = ["training.global_batch_size=4"]
    a = run(four + [f"run_dir={src}", "parallel.tensor=2", "parallel.pipeline=2",
                    "checkpoint.save_interval=2", "checkpoint.keep_last=5"])
    b = run(four + [f"run_dir={os.path.join(root, 'tp1')}",
                    f"checkpoint.load={os.path.join(src, 'checkpoints', 'step_00000002')}"])
    adam_steps = {}

    def adam_step(step, result, state, batches):
        opt = state.optimizer
        inner = getattr(opt, "chained_optimizers", [opt])[0].optimizer
        adam_steps[step] = max(float(s["step"]) for s in inner.state.values())
    c = run(four + [f"run_dir={os.path.join(root, 'stage2')}", "parallel.tensor=2",
                    f"checkpoint.load={src}", "checkpoint.reset_schedule=true",
                    "training.train_steps=2"], step_hook=adam_step)
    return {"tp2pp2": a.losses, "tp1": b.losses, "stage2": (c.losses, c.final_step, adam_steps)}


class GradPoisoner:
    """Makes one weight's gradient NaN or Inf at chosen steps (a tensor hook, so the loss stays
    finite), on the given ranks only: what a bad kernel or an overflow on one GPU does."""

    def __init__(self, values_by_step, ranks=(0,)):
        self.values, self.ranks, self.next_step, self.installed = values_by_step, ranks, 1, False

    def __call__(self, step, result, state, batches):
        if not self.installed:
            if torch.distributed.get_rank() in self.ranks:
                weight = state.model[0].module.decoder.layers[0].mlp.linear_fc1.weight
                weight.register_hook(self._poison)
            self.installed = True
        self.next_step = step + 1

    def _poison(self, grad):
        value = self.values.get(self.next_step)
        return None if value is None else grad + value  # None: the gradient as it is


def nan_gradient_cases(root):
    """TP=2, non-finite gradients on rank 1 only, finite losses everywhere."""
    from megatron_prolong.training.checkpoint import load_checkpoint
    from megatron_prolong.training.loop import TrainingDiverged
    from megatron_prolong.training.weights import weights_are_finite

    _runtime()
    out = {"root": root}
    tp2 = ["parallel.tensor=2"]
    d = lambda name: f"run_dir={os.path.join(root, name)}"  # noqa: E731

    # A NaN gradient at step 2 and an Inf one at step 3: both skipped and counted.
    poison = GradPoisoner({2: float("nan"), 3: float("inf")}, ranks=(1,))
    checksums, results = {}, {}

    def record(step, result, state, batches):
        poison(step, result, state, batches)
        checksums[step] = _checksum(state)
        results[step] = (result.loss, result.grad_norm, result.skipped)
    run(tp2 + [d("skipped"), "training.max_nan_steps=3", "checkpoint.save_interval=3"],
        step_hook=record)
    out["skipped"] = (results, checksums)

    # Non-finite gradients from step 3 on, a save every step, keep_last=1: the run stops at
    # step 4 and what is left is a checkpoint with the (finite) step-2 weights.
    poison = GradPoisoner({s: float("nan") for s in range(3, 7)}, ranks=(1,))
    sums = {}

    def record_sums(step, result, state, batches):
        poison(step, result, state, batches)
        sums[step] = _checksum(state)
    try:
        run(tp2 + [d("diverged"), "training.max_nan_steps=2", "checkpoint.save_interval=1",
                   "checkpoint.keep_last=1"], step_hook=record_sums)
        message = "no error"
    except TrainingDiverged as exc:
        message = str(exc)
    kept = sorted(os.listdir(os.path.join(root, "diverged", "checkpoints")))
    out["diverged"] = (message, kept, _latest(os.path.join(root, "diverged")), sums)

    # Belt and braces: weights that are non-finite however they got so are never saved.
    def corrupt(step, result, state, batches):
        if step == 3:
            with torch.no_grad():
                next(state.model[0].parameters()).view(-1)[0] = float("nan")
    try:
        run(tp2 + [d("nan_weights"), "checkpoint.save_interval=1"], step_hook=corrupt)
        message = "no error"
    except TrainingDiverged as exc:
        message = str(exc)
    # The checkpoint left behind loads and holds finite weights.
    from megatron_prolong.training.step import setup_training

    with _model_parallel(tp2) as (cfg, layout):
        state = setup_training(cfg, _runtime(), layout)
        latest = os.path.join(root, "nan_weights", "checkpoints",
                              _latest(os.path.join(root, "nan_weights")))
        load_checkpoint(state.model, state.optimizer, latest)
        finite = weights_are_finite(state.model)
    out["nan_weights"] = (message, os.path.basename(latest), finite)
    return out
