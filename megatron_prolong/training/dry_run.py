"""Dry run: layout, budget and a per-GPU memory estimate for a recipe, without a GPU.

The estimate is analytic and per rank of the most loaded pipeline stage:
- parameters: bf16 (2 B) or fp32 (4 B); TP shards every matrix, PP splits the layers; the
  first stage holds the embedding, the last the output layer.
- gradients: fp32 main grads (4 B; the DDP buffer reduces in fp32).
- optimizer: fp32 master weights (bf16 runs only) + Adam m and v, sharded over DP x CP by the
  distributed optimizer.
- activations per micro-batch and layer (bf16, flash/varlen attention: no seq^2 term):
  layer-norm inputs/outputs and residuals 4h (split by TP with sequence parallelism), Q/K/V and
  their RoPE'd copies, attention output, SwiGLU 3*ffn (split by TP). Full recomputation keeps
  only each layer's input plus one layer's working set. 1F1B keeps up to PP micro-batches in
  flight on the first stage.
- loss: chunked cross-entropy holds two fp32 [chunk, vocab/tp] buffers; unchunked, the whole
  [tokens, vocab/tp] logits in bf16 and fp32 plus their gradient.
- a fixed 4 GiB for the CUDA context, NCCL buffers and allocator fragmentation (GPU runs).

A recipe with `training.device: cpu` (the tiny CPU smoke tests of slurm/*.sh) is planned for CPU
processes: the report names them, gives the same estimate per process (no CUDA overhead) as
host memory, and has no GPU capacity to check it against.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_prolong.config import Layout, RunConfig, validate

GIB = 2**30
GPU_MEMORY_GIB = {"h100": 79.6, "h200": 139.8}  # usable per GPU (80 GB / 141 GB parts)
OVERHEAD_GIB = 4.0


@dataclass
class MemoryEstimate:
    params: float
    grads: float
    optimizer: float
    activations_none: float  # no recomputation
    activations_selective: float
    activations_full: float
    loss: float
    overhead: float = OVERHEAD_GIB * GIB

    def activations(self, mode: str) -> float:
        return {"none": self.activations_none, "selective": self.activations_selective,
                "full": self.activations_full}[mode]

    def total(self, mode: str) -> float:
        return (self.params + self.grads + self.optimizer + self.activations(mode) + self.loss
                + self.overhead)


def parameter_counts(cfg: RunConfig) -> tuple[int, int, int]:
    """(per transformer layer, embedding, output layer) parameter counts, unsharded."""
    m = cfg.model
    q_dim = m.num_attention_heads * m.kv_channels
    kv_dim = m.num_query_groups * m.kv_channels
    layer = (m.hidden_size * (q_dim + 2 * kv_dim) + q_dim * m.hidden_size
             + 3 * m.hidden_size * m.ffn_hidden_size + 2 * m.hidden_size)
    return layer, m.vocab_size * m.hidden_size, m.vocab_size * m.hidden_size + m.hidden_size


def estimate_memory(cfg: RunConfig, layout: Layout) -> MemoryEstimate:
    m, t, p = cfg.model, cfg.training, cfg.parallel
    tp, pp, cp = layout.tp, layout.pp, layout.cp
    layer, embed, output = parameter_counts(cfg)
    layers_per_stage = m.num_layers // pp
    # The heaviest stage: with pp == 1 it holds both ends.
    ends = embed + output if pp == 1 else max(embed, output)
    params = layers_per_stage * layer / tp + ends / tp
    bf16 = t.precision == "bf16"
    distributed = cfg.optimizer.use_distributed_optimizer
    opt_bytes = (12 if bf16 else 8) / (layout.dp * cp if distributed else 1)

    act = 2  # bytes, bf16 activations
    tokens = t.seq_length * t.micro_batch_size / cp
    h, ffn = m.hidden_size, m.ffn_hidden_size
    q_dim = m.num_attention_heads * m.kv_channels
    kv_dim = m.num_query_groups * m.kv_channels
    replicated = 4 * h / (tp if p.sequence_parallel else 1)
    rope_copies = (q_dim + kv_dim) / tp
    sharded = (q_dim + 2 * kv_dim + q_dim + 3 * ffn) / tp
    per_layer_none = act * tokens * (replicated + sharded + rope_copies)
    per_layer_selective = act * tokens * (replicated + sharded)
    layer_input = act * tokens * h / (tp if p.sequence_parallel else 1)
    in_flight = min(pp, layout.num_microbatches)
    embedding_out = act * tokens * h
    act_none = in_flight * (layers_per_stage * per_layer_none + embedding_out)
    act_selective = in_flight * (layers_per_stage * per_layer_selective + embedding_out)
    act_full = in_flight * (layers_per_stage * layer_input + embedding_out) + per_layer_none

    vocab_shard = m.vocab_size / tp
    if t.loss_chunk_size:
        loss = 2 * 4 * min(t.loss_chunk_size, tokens) * vocab_shard
    else:
        loss = tokens * vocab_shard * (2 + 4 + 4)
    return MemoryEstimate(params=params * (2 if bf16 else 4), grads=params * 4,
                          optimizer=params * opt_bytes, activations_none=act_none,
                          activations_selective=act_selective, activations_full=act_full,
                          loss=loss, overhead=0.0 if t.device == "cpu" else OVERHEAD_GIB * GIB)


def _count(n: float) -> str:
    """8.03B, 20.00B; 1.23M for the tiny models of the CPU smoke tests."""
    return f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.2f}M"


def dry_run_report(cfg: RunConfig, nodes: int, gpus_per_node: int, gpu: str) -> tuple[str, bool]:
    """The printed report and whether the configured run fits the GPU (always True for a CPU
    recipe, whose `gpus_per_node` are CPU processes per node)."""
    gpu = gpu.lower()
    if gpu not in GPU_MEMORY_GIB:
        raise ValueError(f"--gpu {gpu!r}: choose one of {', '.join(GPU_MEMORY_GIB)}")
    on_cpu = cfg.training.device == "cpu"
    world = nodes * gpus_per_node
    layout = validate(cfg, world)
    t = cfg.training
    steps = t.total_steps()
    est = estimate_memory(cfg, layout)
    capacity = GPU_MEMORY_GIB[gpu]
    mode = cfg.model.recompute
    total = est.total(mode) / GIB
    fits = on_cpu or total <= capacity
    layer, embed, output = parameter_counts(cfg)
    n_params = cfg.model.num_layers * layer + embed + output
    g = lambda x: f"{x / GIB:7.2f} GiB"  # noqa: E731
    if on_cpu:
        where = f"{nodes} node(s) x {gpus_per_node} CPU processes = {world} processes"
        per, overhead = "process", "CUDA/NCCL overhead (none)"
        verdict = (f"  device         CPU (training.device=cpu): {total:.2f} GiB of host memory "
                   "per process; no GPU memory to check against")
    else:
        where = f"{nodes} node(s) x {gpus_per_node} {gpu.upper()} = {world} GPUs"
        per, overhead = "GPU", "CUDA/NCCL overhead"
        verdict = (f"  fits on {gpu.upper()} ({capacity} GiB): {'yes' if fits else 'NO'}"
                   + ("" if fits else " - raise parallel.tensor/context, use model.recompute=full, "
                      "or lower training.micro_batch_size"))
    lines = [
        f"dry run: {cfg.name} on {where}",
        f"  model          {cfg.model.preset or 'custom'}: {_count(n_params)} parameters, "
        f"{cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, vocab "
        f"{cfg.model.vocab_size}, RoPE theta {cfg.model.rotary_base:,.0f}",
        f"  layout         TP={layout.tp} PP={layout.pp} CP={layout.cp} DP={layout.dp} "
        f"(sequence parallel: {cfg.parallel.sequence_parallel}, "
        f"distributed optimizer: {cfg.optimizer.use_distributed_optimizer})",
        f"  batch          seq_length {t.seq_length:,} x global batch {t.global_batch_size} = "
        f"{t.tokens_per_step:,} tokens/step; micro-batch {t.micro_batch_size}, "
        f"{layout.num_microbatches} micro-batches/step per DP rank",
        f"  budget         {steps:,} steps = {_count(steps * t.tokens_per_step)} tokens "
        f"(warmup {round(cfg.scheduler.warmup_fraction * steps)} steps, peak LR "
        f"{cfg.optimizer.lr:g}, min {cfg.optimizer.lr * cfg.optimizer.min_lr_ratio:g})",
        f"  memory per {per} (most loaded pipeline stage, {t.precision}):",
        f"    parameters                  {g(est.params)}",
        f"    gradients (fp32)            {g(est.grads)}",
        f"    optimizer state             {g(est.optimizer)}",
        f"    activations, no recompute   {g(est.activations_none)}",
        f"    activations, selective      {g(est.activations_selective)}",
        f"    activations, full recompute {g(est.activations_full)}",
        f"    loss (chunk {t.loss_chunk_size or 'off'})          {g(est.loss)}",
        f"    {overhead:<27} {g(est.overhead)}",
        f"    total, recompute={mode:<9} {g(est.total(mode))}   "
        f"(none: {est.total('none') / GIB:.1f}, full: {est.total('full') / GIB:.1f} GiB)",
        verdict,
    ]
    return "\n".join(lines), fits
