"""One optimizer step on megatron-core: model chunks in DDP, forward_backward_func, optimizer.

Batches are packed rows (THD): tokens/labels/loss_mask of shape [1, T] plus cu_seqlens, as
produced by `megatron_prolong.data.packing.collate_packed`. Losses are token sums; megatron-core
divides the gradients by the number of loss tokens of the whole global batch
(calculate_per_token_loss), so every layout, and SFT's token-scaled loss, see the same objective.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator, Optional

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_prolong.config import Layout, RunConfig
from megatron_prolong.evaluation.forward import sum_over_replicas
from megatron_prolong.model.context_parallel import forward_packed_row, pad_microbatches
from megatron_prolong.model.llama import build_llama, use_transformer_engine
from megatron_prolong.training.parallel import Runtime


def masked_token_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor,
                      domain_ids: Optional[torch.Tensor] = None, num_domains: int = 0):
    """megatron-core's 3-tuple loss contract: (loss sum, loss-token count, values to report).

    With `domain_ids` (per token, into the data source's domain list) the report also holds
    [loss sums per domain, token counts per domain] for per-domain loss curves.
    """
    mask = loss_mask.reshape(-1).float()
    # where, not a product: a masked position's loss may be NaN or inf (an all-padding chunk
    # on a TE CP rank, TE issue 2186), and NaN x 0 is NaN.
    token_loss = torch.where(mask > 0, per_token_loss.reshape(-1).float(), 0.0)
    loss_sum = token_loss.sum()
    count = mask.sum().to(torch.int)
    report = {"lm loss": torch.stack([loss_sum.detach(), mask.sum().detach()])}
    if domain_ids is not None and num_domains:
        ids = domain_ids.reshape(-1).long()
        sums = torch.zeros(2, num_domains, dtype=torch.float32, device=mask.device)
        sums[0].scatter_add_(0, ids, token_loss.detach())
        sums[1].scatter_add_(0, ids, mask)
        report["domain loss"] = sums.reshape(-1)
    return loss_sum, count, report


def forward_step(data_iterator: Iterator[dict], model):
    # Context parallelism: this CP rank's load-balanced share; cu_seqlens stay global.
    batch, output = forward_packed_row(model, next(data_iterator))
    return output, partial(masked_token_loss, batch["loss_mask"],
                           domain_ids=batch.get("domain_ids"),
                           num_domains=int(batch.get("num_domains", 0)))


def to_mcore_optimizer_config(cfg: RunConfig, on_cpu: bool) -> McoreOptimizerConfig:
    o = cfg.optimizer
    bf16 = cfg.training.precision == "bf16"
    return McoreOptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.lr * o.min_lr_ratio,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        # gloo has no reduce-scatter: the distributed optimizer is a GPU (NCCL) feature.
        use_distributed_optimizer=o.use_distributed_optimizer and not on_cpu,
    )


@dataclass
class TrainState:
    model: list  # DDP-wrapped model chunks (one per virtual pipeline stage; here one)
    optimizer: object
    layout: Layout
    forward_backward: Callable = field(repr=False, default=None)


def resolved_model_config(cfg: RunConfig, runtime: Runtime, use_te: bool):
    """cfg.model with `recompute: auto` replaced by the planner's choice for this GPU's memory
    (training/dry_run.py); CPU runs recompute nothing (host memory is not planned)."""
    if cfg.model.recompute != "auto":
        return cfg.model
    from megatron_prolong.config import validate
    from megatron_prolong.training.dry_run import GIB, RecomputePlan, plan_recompute

    if runtime.on_cpu:
        plan = RecomputePlan()
    else:
        capacity = torch.cuda.get_device_properties(runtime.device).total_memory / GIB
        planned = plan_recompute(cfg, validate(cfg, runtime.world_size), capacity, use_te)
        plan = planned.plan
        if runtime.rank == 0:
            print(f"recompute auto -> {plan.label(cfg.model.num_layers // cfg.parallel.pipeline)}"
                  f" (estimate {planned.total / GIB:.1f} of {capacity:.1f} GiB"
                  f"{'' if planned.fits else ', does NOT fit'})", flush=True)
    return plan.apply(cfg.model)


def build_model_chunks(cfg: RunConfig, runtime: Runtime, wrap_ddp: bool = True) -> list:
    use_te = use_transformer_engine(cfg.model)
    module = build_llama(
        resolved_model_config(cfg, runtime, use_te),
        cfg.parallel,
        precision=cfg.training.precision,
        on_cpu=runtime.on_cpu,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        use_te=use_te,
        loss_chunk_size=cfg.training.loss_chunk_size,
        init_seed=cfg.training.seed,  # the same model under every layout
    ).to(runtime.device)
    if not wrap_ddp:
        return [module]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.optimizer.use_distributed_optimizer and not runtime.on_cpu,
        # megatron's check is fatal (its rerun state machine stops the job); a non-finite
        # gradient is skipped instead by optimizer_step below.
        check_for_nan_in_grad=False,
    )
    return [DistributedDataParallel(config=module.config, ddp_config=ddp_config, module=module)]


def setup_training(cfg: RunConfig, runtime: Runtime, layout: Layout) -> TrainState:
    model = build_model_chunks(cfg, runtime)
    config = model[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model[0].no_sync
    config.grad_sync_func = None
    optimizer = get_megatron_optimizer(to_mcore_optimizer_config(cfg, runtime.on_cpu), model)
    return TrainState(model, optimizer, layout, get_forward_backward_func())


@dataclass
class StepResult:
    loss: float  # mean over the global batch's loss tokens
    loss_tokens: int
    grad_norm: Optional[float]
    skipped: bool
    # Per data domain (index into the batches' domain list): loss sums and token counts.
    domain_loss_sums: Optional[list] = None
    domain_tokens: Optional[list] = None


def _global_loss(reports: list[dict], device, num_domains: int = 0) -> torch.Tensor:
    """[loss sum, token count, per-domain sums..., per-domain counts...] over the global
    batch, the same on every rank."""
    totals = torch.zeros(2 + 2 * num_domains, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage():  # the stage that holds the loss
        for report in reports:
            totals[:2] += report["lm loss"].to(totals)
            if num_domains:
                totals[2:] += report["domain loss"].to(totals)
    return sum_over_replicas(totals)


def optimizer_step(optimizer) -> tuple[bool, float]:
    """megatron-core's ChainedOptimizer.step() with one addition: a non-finite gradient norm
    skips the update. (megatron only checks found_inf with an fp16 loss scaler; in bf16 and
    fp32 it clips by a NaN norm, a no-op, and applies the NaN gradients.) The norm is
    megatron's: all-reduced over the model-parallel group after the data-parallel gradient
    reduction, so every rank sees the same value and all skip together.
    Returns (updated, grad norm)."""
    if optimizer.prepare_grads():  # fp16 loss-scaler overflow (found_inf)
        return False, float("nan")
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return False, grad_norm
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = [] if getattr(inner, "is_stub_optimizer", False) else inner.get_parameters()
        if params and inner.config.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32(
                params, max_norm=inner.config.clip_grad, total_norm=grad_norm,
                use_decoupled_grad=inner.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return optimizer.step_with_ready_grads(), grad_norm


def train_step(state: TrainState, microbatches: list[dict], lr: Optional[float] = None) -> StepResult:
    """Forward and backward over this rank's micro-batches, then one optimizer step.

    A non-finite global loss, or a non-finite gradient norm with a finite loss, skips the
    optimizer step (every rank sees the same loss and norm, so all skip together) and returns
    skipped=True; the caller counts and stops on a streak.
    """
    for chunk in state.model:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    if lr is not None:
        for group in state.optimizer.param_groups:
            group["lr"] = lr
    microbatches = pad_microbatches(microbatches, state.model[0].config)  # CP document padding
    row_tokens = int(microbatches[0]["tokens"].shape[1])
    reports = state.forward_backward(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=state.model,
        num_microbatches=len(microbatches),
        seq_length=row_tokens,
        micro_batch_size=1,
        forward_only=False,
    )
    device = next(state.model[0].parameters()).device
    num_domains = int(microbatches[0].get("num_domains", 0))
    totals = _global_loss(reports, device, num_domains)
    count = int(totals[1].item())
    loss = float(totals[0].item() / max(count, 1))
    if torch.isfinite(totals[0]):
        ok, grad_norm = optimizer_step(state.optimizer)
    else:
        ok, grad_norm = False, None
    domains = totals[2:].view(2, num_domains).tolist() if num_domains else (None, None)
    return StepResult(
        loss=loss,
        loss_tokens=count,
        grad_norm=None if grad_norm is None else float(grad_norm),
        skipped=not ok,
        domain_loss_sums=domains[0],
        domain_tokens=domains[1],
    )
