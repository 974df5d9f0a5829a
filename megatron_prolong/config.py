"""Typed run configuration: the schema (sections, presets) and its validation.

Reading a recipe and `key=value` overrides into it is config_loading.py's job.

The dataclasses here hold only what a recipe author sets. megatron-core's own configs
(TransformerConfig, OptimizerConfig, DistributedDataParallelConfig) are built from them by the
`to_*` functions, so that every megatron-core default stays megatron-core's and nothing is
declared twice.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from megatron_prolong.atomic_file import write_text_atomically


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field, the rule and the fix."""


# Kernels of the project's document-masked attention (model/attention.py), for validation.
LOCAL_ATTENTION_KERNELS = ("auto", "cudnn", "flex", "varlen", "flash", "sdpa")
# The synthetic recall tasks megatron_prolong.evaluation generates (named here for validation).
RECALL_TASKS = ("json_kv", "niah_mk")


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """Llama-family architecture. `preset` fills every field first; explicit fields win."""

    preset: Optional[str] = None
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 224
    num_attention_heads: int = 4
    num_query_groups: int = 2
    vocab_size: int = 512
    max_position_embeddings: int = 8192
    rotary_base: float = 500_000.0
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    # auto: Transformer Engine when importable on CUDA, else the project's document-masked
    # attention (FlexAttention / flash-attn / PyTorch kernels on CUDA, SDPA per document on CPU).
    attention_backend: str = "auto"  # auto | te | local
    # Kernel of the local path (docs/performance.md). auto on CUDA in bf16/fp16: cuDNN's
    # packed-row kernel (Hopper+, nvidia-cudnn-frontend), else FlexAttention, else flash-attn
    # varlen, else PyTorch's varlen; SDPA per document otherwise.
    local_attention_kernel: str = "auto"  # auto | cudnn | flex | varlen | flash | sdpa
    # none | selective (`recompute_modules` of every layer) | full (whole layers: with
    # recompute_method uniform, every layer in units of `recompute_num_layers`; with block, the
    # first `recompute_num_layers` layers of each pipeline stage) | auto (the least
    # recomputation that the dry run's memory model fits on the GPU: docs/performance.md)
    recompute: str = "none"
    recompute_num_layers: int = 1
    recompute_method: str = "uniform"  # uniform | block (recompute: full)
    # recompute: selective; any of core_attn, mlp, layernorm (megatron-core's names)
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"])
    # On CUDA, megatron-core's fused SwiGLU (one torch.compile'd kernel each way instead of
    # chunk + silu + mul); TE's spec fuses it itself. CPU runs keep the plain PyTorch ops.
    fused_swiglu: bool = True
    # The chunked loss's element-wise work in torch.compile'd kernels (model/loss.py; CUDA, not
    # measured yet, so off). CPU runs the same formulas uncompiled.
    fused_loss: bool = False

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Llama-3-8B (prolong-recipe.md). rotary_base is the stage's, set by the recipe.
    "llama3-8b": dict(
        num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
        num_query_groups=8, vocab_size=128256, max_position_embeddings=8192,
        rotary_base=500_000.0, norm_epsilon=1e-5,
    ),
    # A Llama-3-shaped toy for CPU tests and the demo: GQA, SwiGLU, RMSNorm, RoPE, untied.
    "tiny": dict(
        num_layers=4, hidden_size=128, ffn_hidden_size=352, num_attention_heads=8,
        num_query_groups=4, vocab_size=512, max_position_embeddings=8192,
        rotary_base=500_000.0, norm_epsilon=1e-5,
    ),
}


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    context: int = 1
    sequence_parallel: bool = False
    # Transformer Engine path: p2p | a2a | allgather | a2a+p2p. The local path always uses
    # Ulysses all-to-all.
    cp_comm_type: str = "p2p"


@dataclass
class TrainingConfig:
    seq_length: int = 2048
    micro_batch_size: int = 1
    global_batch_size: int = 8
    # Budget: train_tokens wins when set (the recipe states budgets in tokens).
    train_tokens: Optional[int] = None
    train_steps: int = 20
    seed: int = 1234
    precision: str = "fp32"  # fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    # Output layer + cross-entropy run over chunks of this many tokens (0: full logits).
    loss_chunk_size: int = 8192
    # Non-finite losses: the step is skipped; this many in a row stop the run.
    max_nan_steps: int = 5
    # Save and exit cleanly after this step (time-limited jobs); None runs to the end.
    exit_at_step: Optional[int] = None

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length

    def total_steps(self) -> int:
        if self.train_tokens:
            return max(1, math.ceil(self.train_tokens / self.tokens_per_step))
        return self.train_steps


@dataclass
class OptimizerConfig:
    """AdamW as ProLong runs it; turned into megatron.core.optimizer.OptimizerConfig."""

    lr: float = 1e-5
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True  # honoured on GPU; CPU/gloo cannot reduce-scatter


@dataclass
class SchedulerConfig:
    warmup_fraction: float = 0.1
    decay_style: str = "cosine"  # cosine | linear | constant


@dataclass
class DataSection:
    """Where the training sequences come from; the data pipeline reads the rest of its knobs
    from `options` so that this file does not mirror every packing option."""

    kind: str = "demo"  # demo | mixture | sft | synthetic
    mixture: Optional[str] = None  # YAML file of domains and proportions
    tokenizer: str = "byte"  # byte | llama3 | sentencepiece | hf
    tokenizer_path: Optional[str] = None
    smart_batching: bool = True
    options: dict = field(default_factory=dict)


@dataclass
class CheckpointConfig:
    save_interval: int = 0  # steps; 0 saves only at the end
    keep_last: int = 3
    load: Optional[str] = None  # a checkpoint directory to start from
    load_optimizer: bool = True
    reset_schedule: bool = False  # stage 2: keep weights and optimizer, restart the LR schedule
    save_dir: Optional[str] = None  # default: <run_dir>/checkpoints


@dataclass
class LoggingConfig:
    log_interval: int = 1
    tensorboard: bool = True
    tensorboard_dir: Optional[str] = None  # default: <run_dir>/tensorboard
    # Peak dense bf16 TFLOP/s of one GPU for MFU; None: from the GPU's name (H100/H200/A100).
    peak_tflops: Optional[float] = None


@dataclass
class EvaluationConfig:
    """Validation on held-out data and synthetic recall, every `interval` steps and at the end
    (megatron_prolong/evaluation; tools/evaluate.py runs the same on any checkpoint)."""

    interval: int = 0  # steps; 0: no evaluation during training
    # Held-out set: this many documents of each domain (or this fraction, whichever is more),
    # chosen by (seed, domain) and never trained on. Or separate datasets: a mixture YAML.
    heldout_docs: int = 0
    heldout_fraction: float = 0.0
    heldout_seed: int = 4321
    validation_mixture: Optional[str] = None
    validation_rows: int = 4  # packed rows per domain
    # Loss by context position: bucket boundaries in tokens (None: 1K, 4K, 16K, ... below the
    # sequence length), over document segments at least `long_document_tokens` long (None: the
    # largest boundary, so each such document reaches every bucket).
    position_buckets: Optional[list[int]] = None
    long_document_tokens: Optional[int] = None
    # Synthetic recall (json_kv, niah_mk) at these lengths (None: training.seq_length) and depths.
    recall_tasks: list[str] = field(default_factory=list)
    recall_lengths: Optional[list[int]] = None
    recall_depths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    recall_examples: int = 1  # per task x length x depth
    recall_template: str = "plain"  # plain (base models) | chat (Llama-3 instruct template)
    recall_seed: int = 0
    plots: bool = True  # PNGs next to the results (needs the `plots` extra: matplotlib)


@dataclass
class RunConfig:
    name: str = "run"
    run_dir: str = "runs/run"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    data: DataSection = field(default_factory=DataSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)


# ---------------------------------------------------------------------------------------------
# Loading (megatron_prolong/config_loading.py: YAML recipe + key=value overrides, errors that
# name the file and line or the override); the names here stay for the modules that use them.
# ---------------------------------------------------------------------------------------------
def load_config(recipe: Optional[str] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Read a YAML recipe (or the built-in defaults when None) and apply key=value overrides."""
    from megatron_prolong.config_loading import load_config as load

    return load(recipe, overrides)


def config_from_dict(raw: dict, where: str = "config") -> RunConfig:
    """A RunConfig from an already parsed mapping (a saved config.yaml); errors start `where`."""
    from megatron_prolong.config_loading import config_from_dict as build

    return build(raw, where)


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str) -> None:
    """Write the fully resolved configuration (presets and overrides applied) as YAML."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomically(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------------------------------------
# Validation: every rule names its field
# ---------------------------------------------------------------------------------------------
@dataclass
class Layout:
    """The resolved parallel layout for a world size."""

    world_size: int
    tp: int
    pp: int
    cp: int
    dp: int
    num_microbatches: int
    # TE's a2a+p2p context parallelism: [all-to-all size, ring size] (parallel_state needs it)
    cp_hierarchy: Optional[list[int]] = None


def hierarchical_cp_sizes(cp: int, gpus_per_node: int = 8) -> list[int]:
    """a2a+p2p: all-to-all inside a node (NVLink), ring across nodes."""
    inner = math.gcd(cp, gpus_per_node)
    return [inner, cp // inner]


def _require(ok: bool, message: str, errors: list[str]) -> None:
    if not ok:
        errors.append(message)


# Fields that must be >= 1 (sizes, counts, steps); the divisibility rules below assume it.
POSITIVE_INTEGERS = (
    "model.num_layers", "model.hidden_size", "model.ffn_hidden_size",
    "model.num_attention_heads", "model.num_query_groups", "model.vocab_size",
    "model.max_position_embeddings", "model.recompute_num_layers",
    "parallel.tensor", "parallel.pipeline", "parallel.context",
    "training.seq_length", "training.micro_batch_size", "training.global_batch_size",
    "training.max_nan_steps", "checkpoint.keep_last", "logging.log_interval",
)
# Fields that must be > 0 when set (None: not used).
POSITIVE_NUMBERS = (
    "model.rotary_base", "model.norm_epsilon", "model.init_method_std", "optimizer.lr",
    "optimizer.adam_eps", "training.train_tokens", "training.exit_at_step",
    "logging.peak_tflops",
)


def _field(cfg: RunConfig, dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def _raise_errors(errors: list[str]) -> None:
    if len(errors) == 1:
        raise ConfigError(f"invalid configuration: {errors[0]}")
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


def _validate_evaluation(cfg: RunConfig, errors: list[str]) -> None:
    e, seq = cfg.evaluation, cfg.training.seq_length
    _require(e.interval >= 0, f"evaluation.interval={e.interval}: must be >= 0 (0: off)", errors)
    _require(e.heldout_docs >= 0, f"evaluation.heldout_docs={e.heldout_docs}: must be >= 0",
             errors)
    _require(0.0 <= e.heldout_fraction < 1.0,
             f"evaluation.heldout_fraction={e.heldout_fraction}: must be in [0, 1)", errors)
    _require(e.validation_rows >= 1,
             f"evaluation.validation_rows={e.validation_rows}: must be >= 1", errors)
    buckets = e.position_buckets or []
    _require(all(0 < b < seq for b in buckets) and buckets == sorted(set(buckets)),
             f"evaluation.position_buckets={buckets}: must be increasing boundaries between 0 and "
             f"training.seq_length={seq} (e.g. [1024, 4096, 16384])", errors)
    _require(e.long_document_tokens is None or 0 < e.long_document_tokens <= seq,
             f"evaluation.long_document_tokens={e.long_document_tokens}: must be in "
             f"[1, training.seq_length={seq}]", errors)
    unknown = [t for t in e.recall_tasks if t not in RECALL_TASKS]
    _require(not unknown, f"evaluation.recall_tasks: unknown task(s) {unknown}; choose from "
             f"{', '.join(RECALL_TASKS)}", errors)
    _require(all(n >= 256 for n in e.recall_lengths or []),
             f"evaluation.recall_lengths={e.recall_lengths}: lengths are in tokens, at least 256",
             errors)
    _require(all(0.0 <= d <= 1.0 for d in e.recall_depths) and bool(e.recall_depths),
             f"evaluation.recall_depths={e.recall_depths}: depths are fractions in [0, 1]", errors)
    _require(e.recall_examples >= 1,
             f"evaluation.recall_examples={e.recall_examples}: must be >= 1", errors)
    _require(e.recall_template in ("plain", "chat"),
             f"evaluation.recall_template={e.recall_template!r}: choose plain or chat", errors)
    validation = e.heldout_docs > 0 or e.heldout_fraction > 0 or e.validation_mixture
    _require(not e.interval or validation or e.recall_tasks,
             f"evaluation.interval={e.interval}: nothing to evaluate; set evaluation.heldout_docs "
             "(or heldout_fraction / validation_mixture) and/or evaluation.recall_tasks", errors)


def _check_signs(cfg: RunConfig, errors: list[str]) -> None:
    for dotted in POSITIVE_INTEGERS:
        value = _field(cfg, dotted)
        _require(value >= 1, f"{dotted}={value}: must be >= 1", errors)
    for dotted in POSITIVE_NUMBERS:
        value = _field(cfg, dotted)
        _require(value is None or value > 0, f"{dotted}={value}: must be > 0", errors)
    t, o = cfg.training, cfg.optimizer
    _require(t.train_tokens is not None or t.train_steps >= 1,
             f"training.train_steps={t.train_steps}: must be >= 1 (or set training.train_tokens)",
             errors)
    for name in ("weight_decay", "clip_grad"):
        value = getattr(o, name)
        _require(value >= 0, f"optimizer.{name}={value}: must be >= 0 (0 disables it)", errors)
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(o, name)
        _require(0.0 <= value < 1.0, f"optimizer.{name}={value}: must be in [0, 1)", errors)


RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")  # megatron-core's, dense models


def _validate_recompute(m: ModelConfig, pp: int, errors: list[str]) -> None:
    _require(m.recompute in ("none", "selective", "full", "auto"),
             f"model.recompute={m.recompute!r}: choose none, selective, full or auto", errors)
    _require(m.recompute_method in ("uniform", "block"),
             f"model.recompute_method={m.recompute_method!r}: choose uniform or block", errors)
    bad = [x for x in m.recompute_modules if x not in RECOMPUTE_MODULES]
    _require(not bad and bool(m.recompute_modules) or m.recompute != "selective",
             f"model.recompute_modules={m.recompute_modules}: choose one or more of "
             f"{', '.join(RECOMPUTE_MODULES)}", errors)
    _require(m.recompute != "selective" or "layernorm" not in m.recompute_modules
             or m.attention_backend != "local",
             "model.recompute_modules=layernorm: runs only on the Transformer Engine spec in "
             "megatron-core 0.16.1 (model.attention_backend is local); use core_attn or mlp",
             errors)
    per_stage = m.num_layers // max(pp, 1)
    _require(m.recompute != "full" or m.recompute_method != "block"
             or m.recompute_num_layers <= per_stage,
             f"model.recompute_num_layers={m.recompute_num_layers}: with recompute_method=block "
             f"at most the {per_stage} layers of a pipeline stage", errors)


def validate(cfg: RunConfig, world_size: int) -> Layout:
    """Check everything that can be checked before a process group or a tensor exists.

    A single problem is reported on one line (`invalid configuration: FIELD=VALUE: rule`),
    several as a list."""
    m, p, t = cfg.model, cfg.parallel, cfg.training
    errors: list[str] = []
    _check_signs(cfg, errors)
    _raise_errors(errors)  # the rules below divide by these fields
    tp, pp, cp = p.tensor, p.pipeline, p.context
    _require(m.hidden_size % m.num_attention_heads == 0,
             f"model.hidden_size={m.hidden_size}: must be divisible by model.num_attention_heads="
             f"{m.num_attention_heads}", errors)
    _require(m.num_attention_heads % m.num_query_groups == 0,
             f"model.num_query_groups={m.num_query_groups}: must divide model.num_attention_heads="
             f"{m.num_attention_heads}", errors)
    _require(m.num_query_groups % tp == 0,
             f"parallel.tensor={tp}: must divide model.num_query_groups={m.num_query_groups} "
             "(each tensor-parallel rank holds whole KV groups)", errors)
    _require(m.ffn_hidden_size % tp == 0,
             f"parallel.tensor={tp}: must divide model.ffn_hidden_size={m.ffn_hidden_size}", errors)
    _require(m.vocab_size % tp == 0,
             f"parallel.tensor={tp}: must divide model.vocab_size={m.vocab_size} "
             "(the vocabulary is split across tensor-parallel ranks)", errors)
    _require(m.num_layers % pp == 0,
             f"parallel.pipeline={pp}: must divide model.num_layers={m.num_layers}", errors)
    # All-to-all CP splits heads: the local path (Ulysses) always, TE with a2a / a2a+p2p
    # (the latter across its intra-node level). TE's p2p and allgather split only the sequence.
    a2a = cp
    if m.attention_backend == "te":
        a2a = {"a2a": cp, "a2a+p2p": hierarchical_cp_sizes(cp)[0]}.get(p.cp_comm_type, 1)
    _require((m.num_attention_heads // max(tp, 1)) % a2a == 0,
             f"parallel.context={cp}: must divide the attention heads per tensor-parallel rank "
             f"({m.num_attention_heads}/{tp}) for all-to-all (Ulysses) context parallelism; "
             "use fewer context ranks, or model.attention_backend=te with "
             "parallel.cp_comm_type=p2p", errors)
    _require(not p.sequence_parallel or tp > 1,
             "parallel.sequence_parallel=true: needs parallel.tensor > 1", errors)
    split = (2 * cp if cp > 1 else 1) * (tp if p.sequence_parallel else 1)
    _require(t.seq_length % split == 0,
             f"training.seq_length={t.seq_length}: must be divisible by {split} "
             f"(2 x context={cp} when context > 1, times tensor={tp} with sequence parallelism)",
             errors)
    _require(p.cp_comm_type in ("p2p", "a2a", "allgather", "a2a+p2p"),
             f"parallel.cp_comm_type={p.cp_comm_type!r}: choose p2p, a2a, allgather or a2a+p2p",
             errors)
    _require(m.attention_backend in ("auto", "te", "local"),
             f"model.attention_backend={m.attention_backend!r}: choose auto, te or local", errors)
    _require(m.local_attention_kernel in LOCAL_ATTENTION_KERNELS,
             f"model.local_attention_kernel={m.local_attention_kernel!r}: choose "
             f"{', '.join(LOCAL_ATTENTION_KERNELS)}", errors)
    _require(m.local_attention_kernel == "auto" or m.attention_backend == "local",
             f"model.local_attention_kernel={m.local_attention_kernel!r}: picks a kernel of the "
             f"local attention path only; set model.attention_backend=local (it is "
             f"{m.attention_backend!r}; auto takes Transformer Engine where installed)", errors)
    _validate_recompute(m, p.pipeline, errors)
    _require(t.precision in ("fp32", "bf16"),
             f"training.precision={t.precision!r}: choose fp32 or bf16", errors)
    _require(t.device in ("auto", "cpu", "cuda"),
             f"training.device={t.device!r}: choose auto, cpu or cuda", errors)
    _require(0.0 <= cfg.scheduler.warmup_fraction < 1.0,
             f"scheduler.warmup_fraction={cfg.scheduler.warmup_fraction}: must be in [0, 1)", errors)
    _require(t.loss_chunk_size >= 0,
             f"training.loss_chunk_size={t.loss_chunk_size}: must be >= 0 (0 disables chunking)",
             errors)
    _require(cfg.checkpoint.save_interval >= 0,
             f"checkpoint.save_interval={cfg.checkpoint.save_interval}: must be >= 0", errors)
    _require(cfg.scheduler.decay_style in ("cosine", "linear", "constant"),
             f"scheduler.decay_style={cfg.scheduler.decay_style!r}: choose cosine, linear or "
             "constant", errors)
    _require(0.0 <= cfg.optimizer.min_lr_ratio <= 1.0,
             f"optimizer.min_lr_ratio={cfg.optimizer.min_lr_ratio}: must be in [0, 1]", errors)

    _validate_evaluation(cfg, errors)

    model_parallel = tp * pp * cp
    dp = world_size // model_parallel if world_size % model_parallel == 0 else 0
    _require(dp > 0,
             f"world size {world_size} is not a multiple of parallel.tensor x pipeline x context "
             f"= {tp} x {pp} x {cp} = {model_parallel}", errors)
    num_microbatches = 0
    if dp:
        per_step = t.micro_batch_size * dp
        _require(t.global_batch_size % per_step == 0,
                 f"training.global_batch_size={t.global_batch_size}: must be a multiple of "
                 f"training.micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}",
                 errors)
        num_microbatches = t.global_batch_size // per_step
    _raise_errors(errors)
    hierarchy = hierarchical_cp_sizes(cp) if cp > 1 and p.cp_comm_type == "a2a+p2p" else None
    return Layout(world_size, tp, pp, cp, dp, num_microbatches, hierarchy)
