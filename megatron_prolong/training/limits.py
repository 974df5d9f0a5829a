"""Start-up limits: a configuration whose step cannot run on this machine is refused before
anything is allocated, with one line naming the fields (exit 2), instead of dying while
allocating 8 TiB (`training.seq_length=2**40`) or running a first step that never ends
(`training.global_batch_size=2**40`).

Two rules, checked after `config.validate` and before the process group, the model or the data:
* a step collects at most MAX_MICROBATCHES_PER_STEP micro-batches per data-parallel rank
  (gradient accumulation beyond that is a typo, not a recipe: ProLong's steps have 2);
* the dry run's per-rank memory estimate (training/dry_run.py: weights, gradients, optimizer
  state, activations, loss buffers) plus the step's collected batches must not exceed
  MEMORY_HEADROOM times what this machine has: the GPU's memory on CUDA, the host's memory
  shared by this node's ranks on CPU. The estimate is within a few percent of measured peaks
  (docs/performance.md), so the headroom only lets through recipes that might fit.
The dry run (`--dry-run`) reports against a named GPU instead and is not affected.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from megatron_prolong.config import ConfigError, Layout, RunConfig
from megatron_prolong.training.dry_run import GIB, RecomputePlan, estimate_memory

MAX_MICROBATCHES_PER_STEP = 65536
MEMORY_HEADROOM = 2.0
# Host bytes per token of a collected micro-batch: tokens, labels, domain ids (int64), loss mask.
BATCH_BYTES_PER_TOKEN = 32


@dataclass
class Machine:
    device: str  # "cpu" or "cuda"
    device_memory: Optional[int]  # bytes of one GPU (None on CPU)
    host_memory: int  # bytes of RAM on this node
    ranks_per_node: int

    def describe(self) -> str:
        if self.device_memory is None:
            return f"{self.host_memory / GIB:.1f} GiB of host memory"
        return f"{self.device_memory / GIB:.1f} GiB of GPU memory"


def this_machine(cfg: RunConfig) -> Machine:
    import psutil
    import torch

    device = cfg.training.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = None
    if device == "cuda" and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
        gpu = torch.cuda.get_device_properties(local).total_memory
    ranks = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or "1"
    try:
        ranks_per_node = max(1, int(ranks))
    except ValueError:  # e.g. Slurm's "8(x2)"
        ranks_per_node = max(1, int(ranks.split("(")[0]))
    return Machine(device, gpu, psutil.virtual_memory().total, ranks_per_node)


def _gib(n: float) -> str:
    return f"{n / GIB:,.1f} GiB"


def check_start_up_limits(cfg: RunConfig, layout: Layout,
                          machine: Optional[Machine] = None) -> None:
    """Raise ConfigError when the step is absurd or cannot fit this machine."""
    t = cfg.training
    if layout.num_microbatches > MAX_MICROBATCHES_PER_STEP:
        raise ConfigError(
            f"invalid configuration: training.global_batch_size={t.global_batch_size}: "
            f"{layout.num_microbatches:,} micro-batches per step on each data-parallel rank "
            f"(global_batch_size / (micro_batch_size={t.micro_batch_size} x data-parallel "
            f"size {layout.dp})), more than {MAX_MICROBATCHES_PER_STEP:,}; lower "
            "training.global_batch_size or raise training.micro_batch_size")
    machine = machine or this_machine(cfg)
    est = estimate_memory(cfg, layout)
    # The configured recomputation as megatron-core will run it (modules, block/uniform); for
    # `auto` the least memory the planner could choose (it picks against the real GPU later).
    plan = (RecomputePlan("full") if cfg.model.recompute == "auto"
            else RecomputePlan.of(cfg.model))
    model_bytes = est.total(plan)
    if machine.device_memory is None:  # CPU processes: no CUDA context or NCCL buffers
        model_bytes -= est.overhead
    # The step's micro-batches are collected in host memory before the step runs.
    batch_bytes = (layout.num_microbatches * t.micro_batch_size * t.seq_length
                   * BATCH_BYTES_PER_TOKEN)
    fix = ("lower training.seq_length, micro_batch_size or global_batch_size, raise "
           "parallel.tensor or parallel.context, or set model.recompute=full; `--dry-run` shows "
           "the estimate")
    fields = (f"training.seq_length={t.seq_length}, training.micro_batch_size="
              f"{t.micro_batch_size}, training.global_batch_size={t.global_batch_size}")
    if machine.device_memory is not None:  # CUDA: the model on the GPU, the batches on the host
        if model_bytes > MEMORY_HEADROOM * machine.device_memory:
            raise ConfigError(
                f"invalid configuration: {fields}: the dry run's estimate is "
                f"{_gib(model_bytes)} per GPU (model.recompute={cfg.model.recompute}), more than "
                f"{MEMORY_HEADROOM:g} x the {machine.describe()} here; {fix}")
        host_need, what = batch_bytes * machine.ranks_per_node, "the step's collected batches"
    else:
        host_need = (model_bytes + batch_bytes) * machine.ranks_per_node
        what = "the dry run's estimate plus the step's collected batches"
    if host_need > MEMORY_HEADROOM * machine.host_memory:
        raise ConfigError(
            f"invalid configuration: {fields}: {what} come to {_gib(host_need)} of host memory "
            f"({machine.ranks_per_node} process(es) on this node, each {_gib(model_bytes)} for "
            f"the model and {_gib(batch_bytes)} of batches), more than {MEMORY_HEADROOM:g} x "
            f"the {_gib(machine.host_memory)} here; {fix}")
