"""Throughput, MFU and loss reporting: a console line per interval, TensorBoard, metrics.jsonl.

FLOPs are analytic, from the model shape, and count only the attention that document masks
leave: a packed row's attention work is the sum over its documents of length**2 (halved for
causality), not seq_length**2. Training FLOPs = 3 x forward (backward is twice the forward);
recomputation is not counted (model FLOPs, as MFU is usually defined).
"""
from __future__ import annotations

import datetime
import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_prolong.atomic_file import write_text_atomically
from megatron_prolong.config import Layout, ModelConfig, RunConfig
from megatron_prolong.training.parallel import collective_device

# Dense bf16 peak TFLOP/s per GPU (no sparsity), by a substring of torch.cuda.get_device_name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}


def dense_flops_per_token(m: ModelConfig) -> float:
    """Forward FLOPs per token of every matmul except attention scores (2 per multiply-add)."""
    kv_dim = m.num_query_groups * m.kv_channels
    q_dim = m.num_attention_heads * m.kv_channels
    per_layer = (2 * m.hidden_size * (q_dim + 2 * kv_dim)  # QKV projection
                 + 2 * q_dim * m.hidden_size  # attention output projection
                 + 2 * 3 * m.hidden_size * m.ffn_hidden_size)  # SwiGLU: gate, up, down
    return m.num_layers * per_layer + 2 * m.hidden_size * m.vocab_size  # + output layer


def attention_flops(m: ModelConfig, sum_sq_doc_lengths: float) -> float:
    """Forward FLOPs of QK^T and AV under causal document masks: per layer 2 matmuls x
    2 FLOPs x q_dim x (sum of L**2 / 2 visible query-key pairs)."""
    q_dim = m.num_attention_heads * m.kv_channels
    return m.num_layers * 2 * q_dim * sum_sq_doc_lengths


def training_flops(m: ModelConfig, tokens: float, sum_sq_doc_lengths: float) -> float:
    return 3.0 * (tokens * dense_flops_per_token(m) + attention_flops(m, sum_sq_doc_lengths))


def microbatch_work(batches: list[dict]) -> tuple[int, float]:
    """(tokens, sum of squared document lengths) of this rank's micro-batches."""
    tokens, sumsq = 0, 0.0
    for b in batches:
        cu = b["cu_seqlens"].to(torch.int64)
        lens = (cu[1:] - cu[:-1]).double()
        tokens += int(b["tokens"].shape[1])
        sumsq += float((lens * lens).sum())
    return tokens, sumsq


def peak_tflops(cfg: RunConfig) -> Optional[float]:
    if cfg.logging.peak_tflops:
        return cfg.logging.peak_tflops
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def memory_gib() -> tuple[str, float]:
    """('gpu', peak allocated since the last call) on CUDA, else ('rss', process RSS)."""
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        return "gpu", peak
    import psutil

    return "rss", psutil.Process().memory_info().rss / 2**30


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(seconds)))


def strict_json(value):
    """NaN and +-Inf become null: metrics.jsonl stays strict JSON (json.loads in other
    languages, jq, pandas.read_json all accept it); a skipped step says so in `skipped`."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def cut_metrics_after(path: str, step: int) -> None:
    """Keep only the records of steps <= `step` (the step a run resumes from; 0 for a fresh
    start), as TensorBoard's purge_step does: steps logged after the last checkpoint by a run
    that then crashed are trained again and must not appear twice. A torn last line goes too;
    records without a step are kept."""
    if not os.path.exists(path):
        return
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
                keep = line.endswith("\n") and int(record.get("step", 0)) <= step
            except (ValueError, AttributeError, TypeError):
                keep = False
            if keep:
                kept.append(line)
            else:
                dropped += 1
    if dropped:
        write_text_atomically(path, "".join(kept))


@dataclass
class _Interval:
    steps: int = 0
    time: float = 0.0
    flops: float = 0.0
    tokens: float = 0.0
    loss_sum: float = 0.0
    loss_steps: int = 0
    domain_sums: dict = field(default_factory=dict)
    domain_tokens: dict = field(default_factory=dict)


class MetricsLogger:
    """Collective `step_done` (one scalar all-reduce for the FLOPs); rank 0 writes."""

    def __init__(self, cfg: RunConfig, layout: Layout, total_steps: int,
                 domain_names: list[str], rank: int, resumed_step: int = 0) -> None:
        self.cfg, self.layout, self.total_steps = cfg, layout, total_steps
        self.domain_names = domain_names
        self.is_writer = rank == 0
        self.peak = peak_tflops(cfg)
        self.interval = _Interval()
        self.skipped_total = 0
        # For the closing summary: what the last console line showed (first step, last step,
        # mean loss) and the loss tokens of each domain over this launch.
        self.last_logged: Optional[tuple[int, int, float]] = None
        self.launch_domain_tokens: dict[str, float] = {}
        self.tb = None
        self.jsonl = None
        if self.is_writer:
            os.makedirs(cfg.run_dir, exist_ok=True)
            path = os.path.join(cfg.run_dir, "metrics.jsonl")
            cut_metrics_after(path, resumed_step)
            self.jsonl = open(path, "a")
            if cfg.logging.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(cfg.logging.tensorboard_dir
                                        or os.path.join(cfg.run_dir, "tensorboard"),
                                        purge_step=resumed_step + 1)

    def step_done(self, step: int, result, lr: float, seconds: float, batches: list[dict],
                  skipped_total: int) -> Optional[str]:
        """Record optimizer step `step` (1-based); returns the console line at log steps."""
        tokens, sumsq = microbatch_work(batches)
        # This DP replica's work is shared by its tp*pp*cp GPUs; average over all GPUs.
        mp = self.layout.tp * self.layout.pp * self.layout.cp
        work = torch.tensor([training_flops(self.cfg.model, tokens, sumsq) / mp, tokens / mp],
                            dtype=torch.float64, device=collective_device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(work)
        work = work.cpu()
        world = self.layout.world_size
        iv = self.interval
        iv.steps += 1
        iv.time += seconds
        iv.flops += float(work[0]) / world
        iv.tokens += float(work[1]) / world
        if math.isfinite(result.loss):
            iv.loss_sum += result.loss
            iv.loss_steps += 1
        names = self._domains(result)
        for name, (s, n) in names.items():
            iv.domain_sums[name] = iv.domain_sums.get(name, 0.0) + s
            iv.domain_tokens[name] = iv.domain_tokens.get(name, 0.0) + n
            self.launch_domain_tokens[name] = self.launch_domain_tokens.get(name, 0.0) + n
        self.skipped_total = skipped_total
        record = dict(step=step, loss=result.loss, lr=lr, grad_norm=result.grad_norm,
                      skipped=result.skipped, skipped_total=skipped_total,
                      loss_tokens=result.loss_tokens, step_time=seconds,
                      domain_loss={k: s / n for k, (s, n) in names.items() if n})
        self._append(record)
        if step % self.cfg.logging.log_interval and step != self.total_steps:
            return None
        return self._flush(step, lr, result.grad_norm)

    def _domains(self, result) -> dict:
        if not result.domain_loss_sums:
            return {}
        return {name: (s, n) for name, s, n in
                zip(self.domain_names, result.domain_loss_sums, result.domain_tokens) if n}

    def _flush(self, step: int, lr: float, grad_norm: Optional[float]) -> Optional[str]:
        iv, self.interval = self.interval, _Interval()
        step_time = iv.time / max(iv.steps, 1)
        tok_s = iv.tokens / max(iv.time, 1e-9)
        tflops = iv.flops / max(iv.time, 1e-9) / 1e12
        mfu = tflops / self.peak if self.peak else None
        loss = iv.loss_sum / iv.loss_steps if iv.loss_steps else float("nan")
        self.last_logged = (step - iv.steps + 1, step, loss)
        mem_kind, mem = memory_gib()
        eta = step_time * (self.total_steps - step)
        if not self.is_writer:
            return None
        line = (f"step {step}/{self.total_steps} | loss {loss:.4f} | lr {lr:.3e} | "
                f"grad norm {grad_norm if grad_norm is not None else float('nan'):.3f} | "
                f"{tok_s:,.0f} tok/s/GPU | {tflops:.2f} TFLOP/s/GPU | "
                f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | "
                f"mem {mem:.2f} GiB ({mem_kind}) | {step_time:.2f} s/step | "
                f"skipped {self.skipped_total} | ETA {format_eta(eta)}")
        if self.tb:
            scalars = {"train/loss": loss, "train/lr": lr, "train/step_time_s": step_time,
                       "throughput/tokens_per_s_per_gpu": tok_s,
                       "throughput/tflops_per_gpu": tflops,
                       f"memory/{mem_kind}_gib": mem, "train/skipped_steps": self.skipped_total}
            if grad_norm is not None:
                scalars["train/grad_norm"] = grad_norm
            if mfu is not None:
                scalars["throughput/mfu"] = mfu
            for name, s in iv.domain_sums.items():
                if iv.domain_tokens[name]:
                    scalars[f"loss_by_domain/{name}"] = s / iv.domain_tokens[name]
            for key, value in scalars.items():
                if value is not None and np.isfinite(value):
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()
        return line

    def log_evaluation(self, step: int, record: dict, scalars: dict, text: str) -> None:
        """An evaluation's results (training/periodic_eval.py): its record in metrics.jsonl
        (told apart from step records by its `eval` key), its scalars in TensorBoard, its text
        on the console (rank 0)."""
        if not self.is_writer:
            return
        print(text, flush=True)
        self._append(record)
        if self.tb:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()

    def _append(self, record: dict) -> None:
        """One strict-JSON line in metrics.jsonl (rank 0), on disk at once."""
        if self.jsonl:
            self.jsonl.write(json.dumps(strict_json(record), allow_nan=False) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.jsonl:
            self.jsonl.close()


def closing_summary(name: str, total: int, losses: dict, start_step: int,
                    started_from: Optional[str], checkpoint: Optional[str], run_dir: str,
                    last_logged: Optional[tuple[int, int, float]] = None,
                    domain_tokens: Optional[dict] = None,
                    targets: Optional[dict] = None) -> str:
    """The lines a finished launch ends with. `losses`: step -> loss of this launch's steps
    (single steps: a log line shows the mean over its interval, so both are named);
    `start_step`: the step this launch resumed at (0 for a fresh start); `domain_tokens`: loss
    tokens each domain gave over this launch, shown beside the mixture's `targets` (shares)."""
    steps = sorted(losses)
    first, last = steps[0], steps[-1]
    line = (f"finished {name} at step {total}: loss {losses[first]:.4f} (step {first}, the "
            f"first of this launch) -> {losses[last]:.4f} (step {last}), single steps")
    if last_logged and last_logged[1] == last and last_logged[0] < last_logged[1]:
        a, b, mean = last_logged
        line += f"; the step-{b} log line shows {mean:.4f}, the mean of steps {a}-{b}"
    if start_step:
        origin = f"resumed at step {start_step} from {started_from}"
    elif started_from:
        origin = f"initialised from {started_from}"
    else:
        origin = "from scratch"
    lines = [line, f"  this launch: steps {first}-{last}, {origin}; checkpoint {checkpoint}; "
                   f"logs in {run_dir}"]
    counted = sum((domain_tokens or {}).values())
    if counted:
        parts = []
        for domain, n in sorted(domain_tokens.items(), key=lambda kv: -kv[1]):
            part = f"{domain} {100 * n / counted:.1f}%"
            if targets and domain in targets:
                part += f" (target {100 * targets[domain]:.1f}%)"
            parts.append(part)
        lines.append(f"  loss tokens by domain, this launch ({counted:,.0f}): " + ", ".join(parts))
    return "\n".join(lines)


def mixture_targets(dataset) -> Optional[dict]:
    """The domain mixture's target shares (normalised weights) by domain name, when the
    dataset is a mixture; None for datasets without one (synthetic data)."""
    weights = getattr(dataset, "weights", None)
    names = getattr(dataset, "domain_names", None)
    if weights is None or names is None or len(weights) != len(names):
        return None
    total = float(sum(weights)) or 1.0
    return {n: float(w) / total for n, w in zip(names, weights)}
