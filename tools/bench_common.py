"""What the GPU benchmarks share: the CPU smoke configuration, timing statistics, the result
row (tokens/s/GPU, TFLOP/s/GPU, MFU from document-masked FLOPs, peak memory), the profiler and
the JSON file. Imported by tools/bench_train.py, bench_hf_peer.py and bench_attention.py (each
puts tools/ on sys.path by being run from it).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Optional

import torch

from megatron_prolong.atomic_file import write_text_atomically
from megatron_prolong.config import RunConfig
from megatron_prolong.training.metrics import microbatch_work, peak_tflops, training_flops

DEFAULT_RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "examples", "bench_64k_1gpu.yaml")

# --tiny: the benchmark recipe shrunk to seconds on a CPU (CI runs every tool this way).
TINY_OVERRIDES = [
    "model.preset=tiny", "model.num_layers=2", "model.max_position_embeddings=1024",
    "model.attention_backend=local", "training.seq_length=256", "training.global_batch_size=2",
    "training.train_steps=4", "training.precision=fp32", "training.device=cpu",
    "training.loss_chunk_size=96",
]


def benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """The options every training benchmark takes: RECIPE.yaml and key=value overrides, the
    timing window, the result file, the profiler, the CPU smoke mode."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", metavar="RECIPE.yaml | key=value",
                   help=f"recipe (default {os.path.relpath(DEFAULT_RECIPE)}) and overrides")
    p.add_argument("--name", help="row name in the results")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    p.add_argument("--json", help="write the result row here")
    p.add_argument("--profile", action="store_true",
                   help="run torch.profiler over the last --profile-steps steps and print the "
                        "top costs (those steps are left out of the timing)")
    p.add_argument("--profile-steps", type=int, default=1)
    p.add_argument("--profile-out", help="also write the profiler table to this file")
    p.add_argument("--tiny", action="store_true", help="CPU smoke configuration (seconds)")
    return p


def parse_benchmark_args(p: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Parse; ns.recipe and ns.overrides (the smoke configuration first under --tiny)."""
    ns = p.parse_intermixed_args(argv)
    recipes = [a for a in ns.args if "=" not in a]
    if len(recipes) > 1:
        p.error(f"more than one recipe given: {recipes}")
    ns.recipe = recipes[0] if recipes else DEFAULT_RECIPE
    ns.overrides = (TINY_OVERRIDES if ns.tiny else []) + [a for a in ns.args if "=" in a]
    ns.profile_window = ns.profile_steps if ns.profile else 0
    return ns


def check_step_budget(total: int, ns: argparse.Namespace) -> Optional[str]:
    """Why `total` steps cannot give a timing, or None."""
    if total <= ns.warmup + ns.profile_window:
        return (f"training.train_steps={total}: must exceed --warmup={ns.warmup} plus the "
                f"profiled steps ({ns.profile_window})")
    return None


def report(row: dict, ns: argparse.Namespace) -> None:
    """Print the profile (and write it to --profile-out), the summary line, the JSON row."""
    if "profile" in row:
        print(row["profile"])
        if ns.profile_out:
            with open(ns.profile_out, "w") as f:
                f.write(row["profile"])
    print(format_row(row), flush=True)
    write_json(ns.json, row)


def timed_steps(steps: list, warmup: int) -> list:
    """The steps after the warm-up ones (compilation, allocator growth); all if too few."""
    return steps[warmup:] if len(steps) > warmup else steps


def step_work(cfg: RunConfig, batches: list[dict]) -> tuple[int, float]:
    """(tokens, model FLOPs) of one optimizer step's micro-batches on one GPU: attention counts
    only what the document masks leave (training/metrics.py)."""
    tokens, sumsq = microbatch_work(batches)
    return tokens, training_flops(cfg.model, tokens, sumsq)


def peak_memory_gib(device: str) -> float:
    """Peak allocated GPU memory (CUDA) or the process's peak resident memory (CPU)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def result_row(name: str, cfg: RunConfig, device: str, steps: list[tuple[float, int, float]],
               peak_gib: float, **extra) -> dict:
    """One row of the results table from the timed steps' (seconds, tokens, FLOPs): rates are
    totals over totals (rows differ in attention work), per GPU (one process)."""
    seconds = sum(s for s, _, _ in steps)
    ok = bool(steps) and seconds > 0
    tflops = sum(f for _, _, f in steps) / seconds / 1e12 if ok else float("nan")
    peak = peak_tflops(cfg) if device == "cuda" else cfg.logging.peak_tflops
    return dict(
        name=name,
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        seq_length=cfg.training.seq_length,
        global_batch_size=cfg.training.global_batch_size,
        layers=cfg.model.num_layers,
        hidden_size=cfg.model.hidden_size,
        timed_steps=len(steps),
        step_time_s=statistics.median(s for s, _, _ in steps) if ok else float("nan"),
        tokens_per_s_per_gpu=sum(t for _, t, _ in steps) / seconds if ok else float("nan"),
        tflops_per_gpu=tflops,
        mfu=tflops / peak if peak and ok else None,
        peak_memory_gib=peak_gib,
        torch=torch.__version__,
        **extra,
    )


def format_row(row: dict) -> str:
    mfu = "n/a" if row.get("mfu") is None else f"{100 * row['mfu']:.1f}%"
    return (f"{row['name']}: {row['tokens_per_s_per_gpu']:,.0f} tok/s/GPU | "
            f"{row['tflops_per_gpu']:.1f} TFLOP/s/GPU | MFU {mfu} | "
            f"peak {row['peak_memory_gib']:.2f} GiB | {row['step_time_s']:.3f} s/step "
            f"(median of {row['timed_steps']} timed steps)")


def write_json(path: Optional[str], obj) -> None:
    """Write atomically (a half-written results file would read as a result)."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomically(path, json.dumps(obj, indent=1, default=str))


class StepProfiler:
    """torch.profiler over a window of steps; `report()` is the table of the top costs."""

    def __init__(self, device: str, rows: int = 25) -> None:
        self.device, self.rows = device, rows
        self._prof = None
        self.seconds = 0.0

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if self.device == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._prof = profile(activities=activities)
        self._prof.start()
        self._started = time.perf_counter()

    def stop(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
        self._prof.stop()
        self.seconds = time.perf_counter() - self._started

    @property
    def active(self) -> bool:
        return self._prof is not None

    def report(self) -> str:
        if self._prof is None:
            return "(profiler did not run)"
        events = self._prof.key_averages()
        key = "self_cpu_time_total"
        if self.device == "cuda":  # torch >= 2.4 calls it device time, older torch cuda time
            key = ("self_device_time_total" if hasattr(events[0], "self_device_time_total")
                   else "self_cuda_time_total") if len(events) else "self_cuda_time_total"
        table = events.table(sort_by=key, row_limit=self.rows)
        return f"top {self.rows} operators by {key} over {self.seconds:.2f} s:\n{table}"
