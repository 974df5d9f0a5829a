"""One-pass answer scoring: prompt + gold answer in, per answer token the gold token's
log-probability and whether it is the argmax.

An example is correct when the argmax at every answer position is the gold token. That is
exactly greedy decoding's exact match: greedy decoding feeds its own argmax back, and as long as
every argmax equals the gold token it has fed back the gold answer, so the one pass saw the same
inputs generation would have; at the first position where they differ, both fail. Ties resolve
to the lowest token id, as torch.argmax (and so transformers' greedy search) does.

Logits are computed only at the answer positions, from the final hidden states and this rank's
shard of the output layer [V/tp, h]: max, argmax, log-sum-exp and the gold logit are combined
over the tensor-parallel group as megatron's vocab-parallel cross-entropy combines them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def answer_token_scores(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [n, h] (replicated over `group`), weight [V/tp, h] (shards in rank order),
    targets [n] -> (gold log-probability [n] fp32, gold is the argmax [n] bool)."""
    tp = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    shard = weight.shape[0]
    logits = torch.matmul(hidden, weight.t()).float()  # [n, V/tp]
    local_max, local_arg = logits.max(dim=1)  # first maximum within the shard
    if tp > 1:
        maxes = [torch.empty_like(local_max) for _ in range(tp)]
        dist.all_gather(maxes, local_max.contiguous(), group=group)
        maxes = torch.stack(maxes, dim=1)  # [n, tp]
        args = [torch.empty_like(local_arg) for _ in range(tp)]
        dist.all_gather(args, local_arg.contiguous(), group=group)
        args = torch.stack(args, dim=1)
        best = maxes.argmax(dim=1)  # the first shard holding the maximum: lowest token id
        global_max = maxes.max(dim=1).values
        argmax = args.gather(1, best[:, None]).squeeze(1) + best * shard
    else:
        global_max, argmax = local_max, local_arg
    lo = rank * shard
    in_shard = (targets >= lo) & (targets < lo + shard)
    idx = (targets - lo).clamp(0, shard - 1)
    gold = logits.gather(1, idx[:, None]).squeeze(1) * in_shard
    sums = torch.stack([(logits - global_max[:, None]).exp().sum(dim=1), gold])
    if tp > 1:
        dist.all_reduce(sums, group=group)
    logprob = sums[1] - global_max - sums[0].log()
    return logprob, argmax == targets


@dataclass
class AnswerScore:
    """Sums over an example's answer tokens (summed across ranks holding parts of it)."""

    logprob_sum: float
    tokens: int
    correct_tokens: int

    @property
    def exact_match(self) -> bool:
        return self.tokens > 0 and self.correct_tokens == self.tokens

    @property
    def mean_logprob(self) -> float:
        return self.logprob_sum / max(self.tokens, 1)

    @property
    def token_accuracy(self) -> float:
        return self.correct_tokens / max(self.tokens, 1)
