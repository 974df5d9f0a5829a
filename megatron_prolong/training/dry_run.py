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
  only each layer's input plus one layer's working set; selective and block recomputation in
  between (MemoryEstimate.activations). 1F1B keeps up to PP micro-batches in flight on the
  first stage.
- `model.recompute: auto`: the candidate that recomputes the fewest FLOPs and fits
  (plan_recompute).
- loss: chunked cross-entropy holds two fp32 [chunk, vocab/tp] buffers; unchunked, the whole
  [tokens, vocab/tp] logits in bf16 and fp32 plus their gradient.
- a fixed 4 GiB for the CUDA context, NCCL buffers and allocator fragmentation (GPU runs).

A recipe with `training.device: cpu` (the tiny CPU smoke tests of slurm/*.sh) is planned for CPU
processes: the report names them, gives the same estimate per process (no CUDA overhead) as
host memory, and has no GPU capacity to check it against.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from megatron_prolong.config import Layout, ModelConfig, RunConfig, validate

GIB = 2**30
# `model.recompute: auto` plans within this share of the GPU: the estimate came within 1% of
# the measured peak on an H100 (docs/performance.md), and an out-of-memory error costs a run.
PLAN_HEADROOM = 0.97
GPU_MEMORY_GIB = {"h100": 79.6, "h200": 139.8}  # usable per GPU (80 GB / 141 GB parts)
OVERHEAD_GIB = 4.0


@dataclass
class LayerActivations:
    """Bytes one transformer layer keeps for its backward, per micro-batch, by what holds them."""
    residuals: float  # the layer's input and the residual after attention
    norms: float  # the two RMSNorm outputs (inputs of linear_qkv and linear_fc1)
    attention: float  # Q/K/V and the attention output
    rope: float  # the RoPE'd copies of Q and K
    mlp: float  # SwiGLU: fc1's [gate; up] output and the activation
    layer_input: float  # what a fully recomputed layer keeps

    @property
    def total(self) -> float:
        return self.residuals + self.norms + self.attention + self.rope + self.mlp


@dataclass(frozen=True)
class RecomputePlan:
    """A recomputation setting of megatron-core: none; selective `modules` of every layer;
    full recomputation of `num_layers` layers (block: the first ones of each stage; uniform
    with num_layers 1: every layer)."""
    recompute: str = "none"  # none | selective | full
    modules: tuple = ()
    method: str = "uniform"
    num_layers: int = 1

    @classmethod
    def of(cls, m: ModelConfig) -> "RecomputePlan":
        if m.recompute == "selective":
            return cls("selective", tuple(m.recompute_modules))
        if m.recompute == "full":
            return cls("full", (), m.recompute_method, m.recompute_num_layers)
        return cls()

    def layers_recomputed(self, layers_per_stage: int) -> int:
        if self.recompute != "full":
            return 0
        return layers_per_stage if self.method == "uniform" else min(self.num_layers,
                                                                     layers_per_stage)

    def label(self, layers_per_stage: int) -> str:
        if self.recompute == "selective":
            return f"selective ({', '.join(self.modules)})"
        if self.recompute == "full":
            n = self.layers_recomputed(layers_per_stage)
            if n == layers_per_stage:
                return f"full (all {n} layers)"
            return f"full (first {n} of {layers_per_stage} layers per stage, block)"
        return "none"

    def apply(self, m: ModelConfig) -> ModelConfig:
        """The model section with this plan in place of `recompute: auto`."""
        return dataclasses.replace(m, recompute=self.recompute,
                                   recompute_modules=list(self.modules) or m.recompute_modules,
                                   recompute_method=self.method,
                                   recompute_num_layers=self.num_layers)


@dataclass
class MemoryEstimate:
    params: float
    grads: float
    optimizer: float
    layer: LayerActivations
    layers_per_stage: int
    in_flight: int  # micro-batches whose activations a stage holds at once (1F1B)
    embedding_out: float
    loss: float
    overhead: float = OVERHEAD_GIB * GIB

    def activations(self, plan) -> float:
        """Peak activation bytes under `plan` (a RecomputePlan, or none | selective | full):
        what each micro-batch in flight keeps at the end of its forward, plus what the
        backward of one rebuilds at a time. Backward runs from the last layer, so with block
        recomputation the layers that kept everything are released before the first
        recomputed layer is rebuilt."""
        if isinstance(plan, str):
            plan = {"none": RecomputePlan(),
                    "selective": RecomputePlan("selective", ("core_attn",)),
                    "full": RecomputePlan("full")}[plan]
        a, layers = self.layer, self.layers_per_stage
        per_layer, rebuilt = a.total, 0.0
        if plan.recompute == "selective":
            # core_attn drops the RoPE'd copies the kernel would keep; mlp keeps fc1's input
            # only and rebuilds one layer's SwiGLU at a time; layernorm (TE) drops the norms.
            per_layer -= (("core_attn" in plan.modules) * a.rope + ("mlp" in plan.modules) * a.mlp
                          + ("layernorm" in plan.modules) * a.norms)
            rebuilt = a.mlp if "mlp" in plan.modules else 0.0
        kept = layers * per_layer
        n = plan.layers_recomputed(layers)
        if n:
            kept = n * a.layer_input + (layers - n) * a.total
            rebuilt = a.total if n == layers else 0.0
        return self.in_flight * (kept + self.embedding_out) + rebuilt

    @property
    def activations_none(self) -> float:
        return self.activations("none")

    @property
    def activations_selective(self) -> float:
        return self.activations("selective")

    @property
    def activations_full(self) -> float:
        return self.activations("full")

    def total(self, plan) -> float:
        return (self.params + self.grads + self.optimizer + self.activations(plan) + self.loss
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
    seq_split = tp if p.sequence_parallel else 1
    per_layer = LayerActivations(
        residuals=act * tokens * 2 * h / seq_split, norms=act * tokens * 2 * h / seq_split,
        attention=act * tokens * (q_dim + 2 * kv_dim + q_dim) / tp,
        rope=act * tokens * (q_dim + kv_dim) / tp, mlp=act * tokens * 3 * ffn / tp,
        layer_input=act * tokens * h / seq_split)
    in_flight = min(pp, layout.num_microbatches)
    embedding_out = act * tokens * h

    vocab_shard = m.vocab_size / tp
    if t.loss_chunk_size:
        loss = 2 * 4 * min(t.loss_chunk_size, tokens) * vocab_shard
    else:
        loss = tokens * vocab_shard * (2 + 4 + 4)
    return MemoryEstimate(params=params * (2 if bf16 else 4), grads=params * 4,
                          optimizer=params * opt_bytes, layer=per_layer,
                          layers_per_stage=layers_per_stage, in_flight=in_flight,
                          embedding_out=embedding_out, loss=loss,
                          overhead=0.0 if t.device == "cpu" else OVERHEAD_GIB * GIB)


def recompute_flops(cfg: RunConfig, layout: Layout, plan: RecomputePlan) -> tuple[float, float]:
    """(FLOPs that `plan` recomputes, the model's training FLOPs) per GPU and step. Attention
    is counted as if each row were one document (an upper bound: the dry run does not know
    the documents)."""
    m, t = cfg.model, cfg.training
    tp, cp = layout.tp, layout.cp
    rows = t.micro_batch_size * layout.num_microbatches
    tokens = rows * t.seq_length / cp
    h, ffn = m.hidden_size, m.ffn_hidden_size
    q_dim = m.num_attention_heads * m.kv_channels
    kv_dim = m.num_query_groups * m.kv_channels
    mlp = tokens * 2 * 3 * h * ffn / tp
    projections = tokens * (2 * h * (q_dim + 2 * kv_dim) + 2 * q_dim * h) / tp
    core = rows * 2 * q_dim * t.seq_length**2 / (tp * cp)
    layer = mlp + projections + core
    stage = m.num_layers // layout.pp
    model = 3 * (stage * layer + tokens * 2 * h * m.vocab_size / tp)
    if plan.recompute == "selective":
        return stage * (("mlp" in plan.modules) * mlp + ("core_attn" in plan.modules) * core), model
    return plan.layers_recomputed(stage) * layer, model


def recompute_candidates(cfg: RunConfig, transformer_engine: bool) -> list[RecomputePlan]:
    """Every setting megatron-core 0.16.1 can run for this model: output-discarding
    `layernorm` recomputation only on Transformer Engine's spec (on the local spec its
    CheckpointWithoutOutput reaches for TE's FP8 state and fails)."""
    modules = ["core_attn", "mlp"] + (["layernorm"] if transformer_engine else [])
    subsets = [tuple(x for i, x in enumerate(modules) if mask >> i & 1)
               for mask in range(1, 2 ** len(modules))]
    stage = cfg.model.num_layers // cfg.parallel.pipeline
    return ([RecomputePlan()] + [RecomputePlan("selective", sub) for sub in subsets]
            + [RecomputePlan("full", (), "block", n) for n in range(1, stage)]
            + [RecomputePlan("full", (), "uniform", 1)])


@dataclass
class PlannedRecompute:
    plan: RecomputePlan
    fits: bool
    activations: float  # bytes
    total: float  # bytes
    extra_flops: float  # per GPU and step
    model_flops: float
    cheaper: Optional[tuple[RecomputePlan, float]]  # the next cheaper plan and its total bytes


def plan_recompute(cfg: RunConfig, layout: Layout, capacity_gib: float,
                   transformer_engine: bool = False) -> PlannedRecompute:
    """`model.recompute: auto`: the candidate that recomputes the fewest FLOPs (ties: less
    memory) whose estimate fits PLAN_HEADROOM of `capacity_gib`; if none fits, the one that
    needs the least memory, reported as not fitting."""
    est = estimate_memory(cfg, layout)
    scored = []
    for plan in recompute_candidates(cfg, transformer_engine):
        extra, model = recompute_flops(cfg, layout, plan)
        scored.append((extra, est.total(plan), plan, model))
    scored.sort(key=lambda x: (x[0], x[1]))
    limit = capacity_gib * GIB * PLAN_HEADROOM
    chosen = next((i for i, x in enumerate(scored) if x[1] <= limit), None)
    fits = chosen is not None
    if not fits:  # the least memory, to report how far off the closest setting is
        chosen = min(range(len(scored)), key=lambda i: scored[i][1])
    extra, total, plan, model = scored[chosen]
    cheaper = (scored[chosen - 1][2], scored[chosen - 1][1]) if chosen > 0 else None
    return PlannedRecompute(plan, fits, est.activations(plan), total, extra, model, cheaper)


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
    layers = est.layers_per_stage
    planned = None
    if cfg.model.recompute == "auto":
        planned = plan_recompute(cfg, layout, capacity, cfg.model.attention_backend == "te")
        plan = planned.plan
    else:
        plan = RecomputePlan.of(cfg.model)
    mode = plan.label(layers)
    total = est.total(plan) / GIB
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
    recompute_lines = []
    if planned is not None:
        extra = (f"recomputes {planned.extra_flops / 1e12:,.1f} TFLOP per step per {per} "
                 f"(+{100 * planned.extra_flops / planned.model_flops:.1f}% of the model's; "
                 "attention as one document per row)")
        recompute_lines.append(f"  recompute      auto -> {mode} (planned within "
                               f"{PLAN_HEADROOM:.0%} of the GPU): activations "
                               f"{planned.activations / GIB:.2f} GiB, {extra}")
        if planned.cheaper and planned.fits:
            cheaper, need = planned.cheaper
            recompute_lines.append(f"                 (cheaper {cheaper.label(layers)} needs "
                                   f"{need / GIB:.1f} GiB)")
        elif not planned.fits:
            recompute_lines.append("                 nothing fits: this is the setting that "
                                   "needs the least memory")
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
        f"    total, recompute {mode:<15} {g(est.total(plan))}   "
        f"(none: {est.total('none') / GIB:.1f}, full: {est.total('full') / GIB:.1f} GiB)",
        *recompute_lines,
        verdict,
    ]
    return "\n".join(lines), fits
