"""Training throughput of a recipe on this machine: tokens/s/GPU, TFLOP/s/GPU, MFU, peak memory.

    python tools/bench_train.py                          # examples/bench_64k_1gpu.yaml, auto kernel
    python tools/bench_train.py model.attention_backend=local model.local_attention_kernel=flex \\
        --name local-flex --json results/local-flex.json
    python tools/bench_train.py --profile                # + torch.profiler's top costs, last steps
    python tools/bench_train.py --tiny                   # CPU smoke run in seconds (CI runs it)

It runs the project's own training loop (megatron_prolong.training.loop.train, the code
`python -m megatron_prolong.train` runs) in this process on a fresh temporary run directory,
takes every optimizer step's time as the loop measures it, and reports medians over the steps
after `--warmup` (compilation and allocator growth happen there). It stops after the last step
without the final checkpoint (the 64K recipe's weights and optimizer state are ~50 GB), and it
never evaluates (evaluation.interval=0).
MFU counts model FLOPs with attention inside documents only (training/metrics.py), against
logging.peak_tflops or the GPU's dense bf16 peak. One process (one GPU) is what it measures.
Exit status: 0 measured, 2 configuration error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import (StepProfiler, benchmark_parser, check_step_budget,  # noqa: E402
                          parse_benchmark_args, peak_memory_gib, report, result_row, step_work,
                          timed_steps)


class _Finished(Exception):
    """Raised by the step hook after the last step: ends the run before its final checkpoint."""


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    return parse_benchmark_args(benchmark_parser(__doc__), argv)


def kernel_label(cfg, on_cuda: bool) -> str:
    """'te', or 'local-<kernel>' with the kernel the local path resolves to here."""
    import torch

    from megatron_prolong.model.attention import resolve_kernel
    from megatron_prolong.model.llama import use_transformer_engine

    if use_transformer_engine(cfg.model):
        return "te"
    dtype = torch.bfloat16 if cfg.training.precision == "bf16" else torch.float32
    return "local-" + resolve_kernel(cfg.model.local_attention_kernel,
                                     "cuda" if on_cuda else "cpu", dtype)


def recompute_label(config) -> str:
    """megatron-core's recomputation settings in a table cell: none, selective (mlp), ..."""
    if config.recompute_granularity is None:
        return "none"
    if config.recompute_granularity == "selective":
        return f"selective ({', '.join(config.recompute_modules)})"
    return f"full ({config.recompute_method}, {config.recompute_num_layers})"


def run(ns: argparse.Namespace, run_dir: str) -> dict:
    from megatron_prolong.config import load_config, validate
    from megatron_prolong.training.loop import train
    from megatron_prolong.training.parallel import init_distributed, init_model_parallel

    probe = load_config(ns.recipe, ns.overrides)
    total = probe.training.total_steps()
    profile_steps = ns.profile_window
    problem = check_step_budget(total, ns)
    if problem:
        raise ValueError(problem)
    # One log line at the end only: the metrics logger resets the CUDA peak-memory counter at
    # every line, and the peak is read here after each step. No evaluation: it is not training
    # work, and its records in metrics.jsonl carry no step time.
    cfg = load_config(ns.recipe, ns.overrides + [
        f"run_dir={run_dir}", "checkpoint.load=null", "logging.tensorboard=false",
        f"logging.log_interval={total}", "evaluation.interval=0"])
    runtime = init_distributed(cfg.training.device)
    layout = validate(cfg, runtime.world_size)
    init_model_parallel(layout, cfg.training.seed)
    device = "cpu" if runtime.on_cpu else "cuda"
    name = ns.name or kernel_label(cfg, device == "cuda")
    profiler = StepProfiler(device)
    work, peaks, losses, recompute = [], [], [], []

    def hook(step, result, state, batches):
        if not recompute:  # what ran: model.recompute=auto is resolved when the model is built
            recompute.append(recompute_label(state.model[0].config))
        work.append(step_work(cfg, batches))
        peaks.append(peak_memory_gib(device))
        losses.append(result.loss)
        print(f"[bench] step {step}/{total} loss {result.loss:.4f}", flush=True)
        if profile_steps and step == total - profile_steps:
            profiler.start()
        if step == total:
            if profiler.active:
                profiler.stop()
            raise _Finished

    try:
        train(cfg, runtime, layout, step_hook=hook)
    except _Finished:
        pass
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        seconds = [json.loads(line)["step_time"] for line in f][:total]
    steps = [(sec, tokens, flops) for sec, (tokens, flops) in zip(seconds, work)]
    timed = timed_steps(steps[:total - profile_steps], ns.warmup)
    row = result_row(name, cfg, device, timed, max(peaks),
                     kind="megatron-prolong", recipe=os.path.relpath(ns.recipe),
                     recompute=recompute[0] if recompute else None,
                     overrides=ns.overrides, losses=losses, all_step_times_s=seconds)
    if profiler.active:
        row["profile"] = profiler.report()
    return row


def main(argv: Optional[list[str]] = None) -> int:
    ns = parse_args(argv)
    from megatron_prolong.config import ConfigError

    with tempfile.TemporaryDirectory(prefix="bench_train_") as run_dir:
        try:
            row = run(ns, run_dir)
        except (ConfigError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        finally:
            from megatron_prolong.training.parallel import destroy_model_parallel

            destroy_model_parallel()
    report(row, ns)
    return 0


if __name__ == "__main__":  # the guard is required: the async checkpoint writer spawns
    sys.exit(main())
