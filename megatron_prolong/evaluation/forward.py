"""Forward-only passes through megatron-core's pipeline schedule, and the reduction that makes
their results the same on every rank, at any TP/PP/CP/DP layout.

Batches are the training step's packed THD rows (one row per micro-batch, cu_seqlens), padded
and split for context parallelism the same way (model/context_parallel.py). Extra per-token
tensors ride along and are split with the tokens:
  eval_domain, eval_bucket  (validation) -> report "validation": [2, domains + buckets + 1]
                            loss sums and token counts (the last column collects tokens outside
                            every bucket);
  answer_mask               (recall)     -> report "answer": [log-prob sum, tokens, correct],
                            from the final hidden states at the answer positions (scoring.py).
The model is called with labels, so it never materialises full-vocabulary logits (its chunked
loss); recall reads the final hidden states through a forward hook on the decoder.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.utils import unwrap_model

from megatron_prolong.evaluation.scoring import answer_token_scores
from megatron_prolong.model.context_parallel import forward_packed_row, pad_microbatches


def _answer_report(batch: dict, hidden: torch.Tensor, gpt) -> torch.Tensor:
    layer = gpt.output_layer
    if layer.sequence_parallel:
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        hidden = gather_from_sequence_parallel_region(hidden, group=layer.tp_group)
    positions = torch.nonzero(batch["answer_mask"][0] > 0).squeeze(1)
    targets = batch["labels"][0, positions]
    group = layer.tp_group if dist.get_world_size(layer.tp_group) > 1 else None
    logprob, correct = answer_token_scores(hidden[positions, 0], layer.weight, targets, group)
    return torch.stack([logprob.double().sum(),
                        logprob.new_tensor(float(len(positions)), dtype=torch.float64),
                        correct.double().sum()])


def validation_sums(batch: dict, per_token_loss: torch.Tensor) -> torch.Tensor:
    """[2, domains + buckets + 1]: loss sums and loss-token counts per domain, then per
    position bucket (the last column: tokens of segments too short for the buckets)."""
    domains, buckets = batch["eval_sizes"]
    mask = batch["loss_mask"].reshape(-1).double()
    loss = torch.where(mask > 0, per_token_loss.reshape(-1).double(), 0.0)  # NaN x 0 is NaN
    sums = torch.zeros(2, domains + buckets + 1, dtype=torch.float64, device=mask.device)
    for offset, ids in ((0, batch["eval_domain"]), (domains, batch["eval_bucket"])):
        ids = ids.reshape(-1).long() + offset
        sums[0].scatter_add_(0, ids, loss)
        sums[1].scatter_add_(0, ids, mask)
    return sums


def _eval_loss(batch: dict, captured: list, gpt, output: torch.Tensor):
    report = {}
    if "eval_domain" in batch:
        report["validation"] = validation_sums(batch, output)
    if "answer_mask" in batch:
        report["answer"] = _answer_report(batch, captured[0], gpt)
    nothing = torch.zeros((), device=output.device)  # no loss to back-propagate
    return nothing, torch.zeros((), dtype=torch.int, device=output.device), report


def eval_forward_step(data_iterator: Iterator[dict], model):
    batch = next(data_iterator)
    gpt = unwrap_model(model)
    captured: list = []
    hook = None
    if "answer_mask" in batch and gpt.post_process:
        def keep(_module, _inputs, out):
            captured.append(out[0] if isinstance(out, tuple) else out)

        hook = gpt.decoder.register_forward_hook(keep)
    try:
        batch, output = forward_packed_row(model, batch)
    finally:
        if hook is not None:
            hook.remove()
    return output, partial(_eval_loss, batch, captured, gpt)


def forward_only(model: list, forward_backward: Callable, batches: list[dict]) -> list[dict]:
    """Run packed rows of equal length through the schedule without gradients; the per
    micro-batch reports on the last pipeline stage (an empty list elsewhere)."""
    if not batches:
        return []
    config = model[0].config
    batches = pad_microbatches(batches, config)
    modes = [chunk.training for chunk in model]
    for chunk in model:
        chunk.eval()
    try:
        with torch.no_grad():
            reports = forward_backward(
                forward_step_func=eval_forward_step, data_iterator=iter(batches), model=model,
                num_microbatches=len(batches), seq_length=int(batches[0]["tokens"].shape[1]),
                micro_batch_size=1, forward_only=True)
    finally:
        for chunk, mode in zip(model, modes):
            chunk.train(mode)
    return list(reports) if parallel_state.is_pipeline_last_stage() else []


def sum_over_replicas(local: torch.Tensor, device: Optional[torch.device] = None) -> torch.Tensor:
    """Collective: sum the last pipeline stage's values over the data x context-parallel group,
    then give every rank the result (broadcast along the pipeline). Tensor-parallel ranks
    already agree."""
    total = local.to(device=device, dtype=torch.float64).contiguous()
    if parallel_state.is_pipeline_last_stage():
        dist.all_reduce(total,
                        group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    dist.broadcast(total, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return total
