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
without the final checkpoint: the 64K recipe's weights and optimizer state are ~50 GB.
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

from bench_common import (DEFAULT_RECIPE, TINY_OVERRIDES, StepProfiler,  # noqa: E402
                          format_row, peak_memory_gib, result_row, step_work, timed_steps,
                          write_json)


class _Finished(Exception):
    """Raised by the step hook after the last step: ends the run before its final checkpoint."""


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", metavar="RECIPE.yaml | key=value",
                   help=f"recipe (default {os.path.relpath(DEFAULT_RECIPE)}) and overrides")
    p.add_argument("--name", help="row name in the results (default: backend and kernel)")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    p.add_argument("--json", help="write the result row here")
    p.add_argument("--profile", action="store_true",
                   help="run torch.profiler over the last --profile-steps steps and print the "
                        "top costs (those steps are left out of the timing)")
    p.add_argument("--profile-steps", type=int, default=1)
    p.add_argument("--profile-out", help="also write the profiler table to this file")
    p.add_argument("--tiny", action="store_true", help="CPU smoke configuration (seconds)")
    ns = p.parse_intermixed_args(argv)
    recipes = [a for a in ns.args if "=" not in a]
    if len(recipes) > 1:
        p.error(f"more than one recipe given: {recipes}")
    ns.recipe = recipes[0] if recipes else DEFAULT_RECIPE
    ns.overrides = (TINY_OVERRIDES if ns.tiny else []) + [a for a in ns.args if "=" in a]
    return ns


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


def run(ns: argparse.Namespace, run_dir: str) -> dict:
    from megatron_prolong.config import load_config, validate
    from megatron_prolong.training.loop import train
    from megatron_prolong.training.parallel import init_distributed, init_model_parallel

    probe = load_config(ns.recipe, ns.overrides)
    total = probe.training.total_steps()
    profile_steps = ns.profile_steps if ns.profile else 0
    if total <= ns.warmup + profile_steps:
        raise ValueError(f"training.train_steps={total}: must exceed --warmup={ns.warmup} plus "
                         f"the profiled steps ({profile_steps})")
    # One log line at the end only: the metrics logger resets the CUDA peak-memory counter at
    # every line, and the peak is read here after each step.
    cfg = load_config(ns.recipe, ns.overrides + [
        f"run_dir={run_dir}", "checkpoint.load=null", "logging.tensorboard=false",
        f"logging.log_interval={total}"])
    runtime = init_distributed(cfg.training.device)
    layout = validate(cfg, runtime.world_size)
    init_model_parallel(layout, cfg.training.seed)
    device = "cpu" if runtime.on_cpu else "cuda"
    name = ns.name or kernel_label(cfg, device == "cuda")
    profiler = StepProfiler(device)
    work, peaks, losses = [], [], []

    def hook(step, result, state, batches):
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
    if "profile" in row:
        print(row["profile"])
        if ns.profile_out:
            with open(ns.profile_out, "w") as f:
                f.write(row["profile"])
    print(format_row(row), flush=True)
    write_json(ns.json, row)
    return 0


if __name__ == "__main__":  # the guard is required: the async checkpoint writer spawns
    sys.exit(main())
