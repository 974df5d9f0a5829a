"""The training loop: resume, step, log, checkpoint, stop on preemption or divergence.

Side jobs are small pieces the loop calls: LRSchedule (schedule.py), CheckpointManager
(checkpoint.py), MetricsLogger (metrics.py), DataSource (data_source.py); one step is
training/step.train_step.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_prolong.config import Layout, RunConfig, save_config
from megatron_prolong.training.agreement import on_all_ranks
from megatron_prolong.training.checkpoint import (
    CheckpointManager,
    Progress,
    check_model_shape,
    is_weights_only,
    load_checkpoint,
    resolve_checkpoint,
)
from megatron_prolong.training.data_source import build_data_source
from megatron_prolong.training.metrics import MetricsLogger, closing_summary, mixture_targets
from megatron_prolong.training.parallel import Runtime
from megatron_prolong.training.periodic_eval import PeriodicEvaluation
from megatron_prolong.training.run_lock import RunDirLock
from megatron_prolong.training.preemption import (
    PreemptionFlag,
    clear_preempted_marker,
    collection_poll,
    write_preempted_marker,
)
from megatron_prolong.training.schedule import LRSchedule
from megatron_prolong.training.step import TrainState, setup_training, train_step
from megatron_prolong.training.weights import weights_are_finite


class TrainingDiverged(RuntimeError):
    """Too many skipped (non-finite) steps in a row, or non-finite weights; the last good
    checkpoint is left in place."""


@dataclass
class RunResult:
    losses: dict = field(default_factory=dict)  # step (1-based) -> global mean loss
    final_step: int = 0
    stop_reason: str = "done"  # done | preempted | exit_at_step
    checkpoint: Optional[str] = None
    resumed_from: Optional[str] = None


def _print0(*args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def find_start(cfg: RunConfig, ckpt: CheckpointManager) -> tuple[Optional[str], Optional[str]]:
    """(this run's own latest checkpoint, checkpoint.load's), both resolved and checked
    against cfg.model's shape before anything in the run directory is touched."""
    own = ckpt.latest()
    if own:
        check_model_shape(own, cfg.model, "relaunch with the model section of "
                          f"{os.path.join(own, 'config.yaml')}, or pass run_dir=... to start "
                          "a new run")
        return own, None
    if cfg.checkpoint.load:
        source = resolve_checkpoint(cfg.checkpoint.load)
        check_model_shape(source, cfg.model, "set the model section to that shape, or point "
                          "checkpoint.load at a checkpoint of this one")
        return None, source
    return None, None


def restore(cfg: RunConfig, state: TrainState, layout: Layout, own: Optional[str],
            source: Optional[str], ckpt: CheckpointManager) -> tuple[Progress, Optional[str]]:
    """Resume this run from its own latest checkpoint; else start from checkpoint.load
    (stage 2 from stage 1, SFT from stage 2); else from scratch."""
    fresh = Progress(layout=asdict(layout))
    if own:
        progress, own = ckpt.resume(state.model, state.optimizer, own)  # falls back if damaged
        progress.layout = asdict(layout)
        _print0(f"resuming from {own} (step {progress.step}, "
                f"{progress.consumed_samples} samples consumed)")
        return progress, own
    if source:
        loaded = load_checkpoint(state.model, state.optimizer, source,
                                 load_optimizer=cfg.checkpoint.load_optimizer, load_rng=False)
        weights_only = is_weights_only(source) or not cfg.checkpoint.load_optimizer
        what = "weights" if weights_only else "weights + optimizer state"
        if cfg.checkpoint.reset_schedule or is_weights_only(source):
            _print0(f"initialised {what} from {source}; LR schedule and data restart at step 0")
            return fresh, source
        loaded.layout = asdict(layout)
        _print0(f"initialised {what} from {source}; continuing at step {loaded.step}")
        return loaded, source
    return fresh, None


def lock_run_dirs(cfg: RunConfig, rank: int) -> list[RunDirLock]:
    """Rank 0 owns run_dir (and checkpoint.save_dir when it lies elsewhere) for this launch."""
    dirs = [cfg.run_dir]
    save_dir = cfg.checkpoint.save_dir
    # run_dir itself or a folder inside it is covered by run_dir's lock (a second flock on
    # the same file from this process would refuse this very launch).
    run_dir = os.path.realpath(cfg.run_dir)
    if save_dir and os.path.commonpath([os.path.realpath(save_dir), run_dir]) != run_dir:
        dirs.append(save_dir)
    locks = [RunDirLock(d) for d in dirs] if rank == 0 else []
    try:
        for lock in locks:
            lock.acquire()
    except BaseException:
        release_locks(locks)
        raise
    return locks


def release_locks(locks: list[RunDirLock]) -> None:
    for lock in locks:
        lock.release()


def _diverged(message: str, last_good: Optional[str]) -> TrainingDiverged:
    return TrainingDiverged(
        f"{message}; stopping without saving. The last good checkpoint is "
        f"{last_good or '(none saved yet)'}: lower optimizer.lr, check the data around these "
        "steps, then relaunch (it resumes from there).")


def train(cfg: RunConfig, runtime: Runtime, layout: Layout,
          step_hook: Optional[Callable] = None, data_source=None,
          preemption: Optional[PreemptionFlag] = None) -> RunResult:
    """Run (or resume) training to cfg's step budget. Collective over all ranks.

    `step_hook(step, result, state, batches)` runs after every step (tests, custom callbacks);
    `data_source` replaces the one built from cfg.data (tests); `preemption` is the flag the
    entry point installed at process start (else one is installed here)."""
    locks = on_all_ranks(lambda: lock_run_dirs(cfg, runtime.rank))
    try:
        return _train_locked(cfg, runtime, layout, step_hook, data_source, preemption)
    finally:
        release_locks(locks)


def _train_locked(cfg: RunConfig, runtime: Runtime, layout: Layout,
                  step_hook: Optional[Callable], data_source,
                  preemption: Optional[PreemptionFlag]) -> RunResult:
    ckpt = CheckpointManager(cfg.checkpoint.save_dir or os.path.join(cfg.run_dir, "checkpoints"),
                             cfg.checkpoint.keep_last, run_config=cfg)
    own, source = on_all_ranks(lambda: find_start(cfg, ckpt))
    if runtime.rank == 0:  # only once the checkpoint is known to fit this config
        save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
        clear_preempted_marker(cfg.run_dir)
    state = setup_training(cfg, runtime, layout)
    progress, resumed_from = restore(cfg, state, layout, own, source, ckpt)
    schedule = LRSchedule.from_config(cfg)
    total = schedule.total_steps
    if data_source is None:
        dp_rank = parallel_state.get_data_parallel_rank()
        data_source = build_data_source(cfg, layout, dp_rank, progress.consumed_samples)
    metrics = MetricsLogger(cfg, layout, total, data_source.domain_names, runtime.rank,
                            resumed_step=progress.step)
    evaluation = PeriodicEvaluation(cfg, data_source, metrics, runtime.rank)
    _print0(f"training {cfg.name}: layout TP={layout.tp} PP={layout.pp} CP={layout.cp} "
            f"DP={layout.dp}, {layout.num_microbatches} micro-batches/step, "
            f"{cfg.training.tokens_per_step:,} tokens/step, steps {progress.step} -> {total}")
    result = RunResult(final_step=progress.step, resumed_from=resumed_from)
    nan_streak = 0
    last_saved = resumed_from if own else None  # resume may have fallen back past `own`

    def save() -> str:
        # Skipped steps leave the weights alone, so this should never trigger; it is the
        # guarantee that no checkpoint (and so no `latest`, no keep_last survivor) holds NaN.
        if not weights_are_finite(state.model):
            raise _diverged(f"the weights are non-finite after step {progress.step}",
                            last_saved)
        return ckpt.save(state.model, state.optimizer, progress)

    try:
        flag = PreemptionFlag() if preemption is None else contextlib.nullcontext(preemption)
        with flag as preemption:
            # A signal during start-up (imports, rendezvous, model build, checkpoint load):
            # nothing was trained since `resumed_from`, so stop without saving.
            if progress.step < total and preemption.any_rank():
                result.stop_reason = "preempted"
                _print0(f"preempted during start-up ({preemption.signal_name}), before step "
                        f"{progress.step + 1}: nothing new to save; relaunch to resume from "
                        f"{resumed_from or 'the start'}")
            saved_step = progress.step  # nothing is trained yet: nothing new to save
            while result.stop_reason == "done" and progress.step < total:
                batches = data_source.next_step(collection_poll(preemption))
                if batches is None:  # every rank agreed: a signal while collecting the batches
                    result.stop_reason = "preempted"
                    if progress.step > saved_step:
                        last_saved = result.checkpoint = save()
                        _print0(f"saved checkpoint {last_saved}")
                    _print0(f"preempted ({preemption.signal_name}) while collecting the batches "
                            f"of step {progress.step + 1}: step given up; relaunch to resume from "
                            f"{last_saved or resumed_from or 'the start'}")
                    break
                lr = schedule.lr(progress.step)
                start = time.perf_counter()
                step_result = train_step(state, batches, lr)
                seconds = time.perf_counter() - start
                progress.step += 1
                progress.consumed_samples = data_source.consumed_samples
                skipped = step_result.skipped
                nan_streak = nan_streak + 1 if skipped else 0
                progress.skipped_steps += 1 if skipped else 0
                result.losses[progress.step] = step_result.loss
                result.final_step = progress.step
                line = metrics.step_done(progress.step, step_result, lr, seconds, batches,
                                         progress.skipped_steps)
                if line:
                    _print0(line)
                if skipped:
                    _print0(f"step {progress.step}: {_skip_reason(step_result)}; optimizer "
                            f"step skipped ({nan_streak} in a row, limit "
                            f"{cfg.training.max_nan_steps})")
                if nan_streak >= cfg.training.max_nan_steps:
                    raise _diverged(
                        f"{nan_streak} skipped steps (non-finite loss or gradient) in a row "
                        f"(training.max_nan_steps={cfg.training.max_nan_steps}) at step "
                        f"{progress.step}", last_saved)
                if step_hook is not None:
                    step_hook(progress.step, step_result, state, batches)
                evaluation.after_step(progress.step, total, state)  # when evaluation.interval is due
                preempted = preemption.any_rank()
                exit_now = cfg.training.exit_at_step == progress.step
                interval = cfg.checkpoint.save_interval
                if (preempted or exit_now or progress.step == total
                        or (interval and progress.step % interval == 0)):
                    signalled_before = preemption.received is not None
                    last_saved = save()
                    result.checkpoint, saved_step = last_saved, progress.step
                    _print0(f"saved checkpoint {last_saved}")
                    if (not signalled_before and preemption.received is not None
                            and progress.step < total):
                        _print0(f"{preemption.signal_name} arrived during this save, which "
                                "completed; stopping after the next step")
                if preempted or exit_now:
                    result.stop_reason = "preempted" if preempted else "exit_at_step"
                    _print0(f"stopping after step {progress.step} "
                            f"({result.stop_reason}); relaunch to resume from {last_saved}")
                    break
        if result.stop_reason == "preempted" and runtime.rank == 0:
            write_preempted_marker(cfg.run_dir, progress.step, preemption.signal_name,
                                   last_saved or resumed_from)
    finally:
        metrics.close()
        sys.stdout.flush()
    if result.stop_reason == "done" and progress.step >= total:
        if result.losses:
            _print0(closing_summary(cfg.name, total, result.losses, min(result.losses) - 1,
                                    resumed_from, last_saved, cfg.run_dir, metrics.last_logged,
                                    metrics.launch_domain_tokens,
                                    mixture_targets(getattr(data_source, "dataset", None))))
        else:
            _print0(f"nothing to do: {cfg.run_dir} is already complete at step {total} "
                    f"(checkpoint {last_saved}); pass run_dir=... or raise the step budget to "
                    "train further")
    return result


def _skip_reason(step_result) -> str:
    if not math.isfinite(step_result.loss):
        return f"non-finite loss ({step_result.loss})"
    return (f"non-finite gradient (grad norm {step_result.grad_norm}, loss "
            f"{step_result.loss:.4f})")
