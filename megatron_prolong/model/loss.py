"""Chunked, vocabulary-parallel cross-entropy fused with the output layer.

At 64K tokens the full logits of a 128,256-word vocabulary are 16.8 GB in fp32 (megatron-core's
cross-entropy upcasts them). Here the output projection and the loss run over chunks of
`chunk_size` tokens: the forward keeps only the per-token loss and the per-token log-sum-exp,
the backward recomputes one chunk's logits at a time and turns them into gradients in place.
Peak extra memory is about two [chunk, vocab/tp] fp32 buffers, independent of sequence length.

Tensor parallelism: the weight is the output layer's shard [vocab/tp, hidden]; the max, the
sum of exponentials and the target logit are all-reduced over the tensor-parallel group, as in
megatron's vocab_parallel_cross_entropy. The backward needs no communication (the log-sum-exp is
kept from the forward); the caller routes the hidden states through megatron's
copy-to-TP-region (or the sequence-parallel gather), whose backward sums the partial input
gradients over the TP ranks. Context parallelism needs nothing: each rank's tokens are
independent rows here.

Fused (`model.fused_loss`, CUDA): the element-wise work of a chunk (the fp32 upcast, the
max, exp and sum of the forward; exp, the one-hot subtraction, the scaling and the cast back of
the backward) runs in torch.compile'd kernels that read the bf16 logits once and never
materialize fp32 [chunk, vocab/tp] tensors: about 70 GB less memory traffic per 8,192-token chunk
of a 128,256-word vocabulary (docs/performance.md). Same formulas, same all-reduces.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist

DEFAULT_CHUNK_SIZE = 8192


def _sum_exp_and_target(logits, row_max, idx, in_shard):
    """sum(exp(logits - max)) per row and the target's logit minus max (0 off this shard)."""
    shifted = logits.float() - row_max[:, None]
    target = shifted.gather(1, idx[:, None]).squeeze(1) * in_shard
    return shifted.exp().sum(dim=1), target


def _logits_grad(logits, lse, target_local, in_shard, grad_loss, dtype):
    """(softmax - onehot(target)) * grad, in `dtype`: d loss / d logits of a chunk."""
    probs = (logits.float() - lse[:, None]).exp()
    cols = torch.arange(logits.shape[1], device=logits.device)
    onehot = (cols[None, :] == target_local[:, None]) & in_shard[:, None]
    return ((probs - onehot.float()) * grad_loss[:, None]).to(dtype)


@functools.lru_cache(maxsize=None)
def _fused(fn_name: str, compiled: bool):
    fn = {"stats": _sum_exp_and_target, "grad": _logits_grad}[fn_name]
    # dynamic=False: one kernel for full chunks, one for the row's last, shorter chunk.
    return torch.compile(fn, dynamic=False) if compiled else fn


def _vocab_range(weight: torch.Tensor, group) -> tuple[int, int]:
    rank = dist.get_rank(group) if group is not None else 0
    shard = weight.shape[0]
    return rank * shard, (rank + 1) * shard


def _all_reduce(t: torch.Tensor, op, group) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, group, fused=False):
        # hidden [N, h], weight [V/tp, h], labels [N] -> per-token loss [N] (fp32)
        n = hidden.shape[0]
        lo, hi = _vocab_range(weight, group)
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        ctx.chunk_size, ctx.vocab_range, ctx.fused = chunk_size, (lo, hi), fused
        if fused:
            _fused_forward(hidden, weight, labels, chunk_size, group, (lo, hi), loss, lse)
            ctx.save_for_backward(hidden, weight, labels, lse)
            return loss
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logits = torch.matmul(hidden[start:end], weight.t()).float()
            local_max = logits.max(dim=1).values
            _all_reduce(local_max, dist.ReduceOp.MAX, group)
            logits.sub_(local_max[:, None])
            target = labels[start:end]
            in_shard = (target >= lo) & (target < hi)
            idx = (target - lo).clamp(0, hi - lo - 1)
            target_logit = logits.gather(1, idx[:, None]).squeeze(1) * in_shard
            sum_exp = logits.exp_().sum(dim=1)
            both = torch.stack([sum_exp, target_logit])
            _all_reduce(both, dist.ReduceOp.SUM, group)
            chunk_lse = both[0].log()
            loss[start:end] = chunk_lse - both[1]
            lse[start:end] = chunk_lse + local_max
            del logits
        ctx.save_for_backward(hidden, weight, labels, lse)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, labels, lse = ctx.saved_tensors
        lo, hi = ctx.vocab_range
        chunk_size = ctx.chunk_size
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                       if ctx.needs_input_grad[1] else None)
        grad_loss = grad_loss.float()
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            h = hidden[start:end]
            # d loss / d logits = softmax - onehot(target), scaled by the incoming gradient.
            target = labels[start:end]
            in_shard = (target >= lo) & (target < hi)
            if ctx.fused:
                grad_logits = None
                g = _fused("grad", hidden.is_cuda)(torch.matmul(h, weight.t()), lse[start:end],
                                                   target - lo, in_shard, grad_loss[start:end],
                                                   weight.dtype)
            else:
                grad_logits = torch.matmul(h, weight.t()).float()
                grad_logits.sub_(lse[start:end, None]).exp_()
                rows = torch.nonzero(in_shard).squeeze(1)
                grad_logits[rows, target[rows] - lo] -= 1.0
                grad_logits.mul_(grad_loss[start:end, None])
                g = grad_logits.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = torch.matmul(g, weight)
            if grad_weight is not None:
                if h.dtype == grad_weight.dtype:  # accumulate in place: no [V/tp, h] temporary
                    grad_weight.addmm_(g.t(), h)
                else:
                    grad_weight.add_(torch.matmul(g.t(), h))
            del grad_logits, g
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _fused_forward(hidden, weight, labels, chunk_size, group, vocab_range, loss, lse):
    """The forward's chunks with the element-wise work in compiled kernels (see the module doc):
    the same max / sum-of-exponentials / target-logit all-reduces as the plain loop."""
    lo, hi = vocab_range
    stats = _fused("stats", hidden.is_cuda)
    for start in range(0, hidden.shape[0], chunk_size):
        end = min(start + chunk_size, hidden.shape[0])
        logits = torch.matmul(hidden[start:end], weight.t())  # [chunk, V/tp] in hidden's dtype
        local_max = logits.amax(dim=1).float()
        _all_reduce(local_max, dist.ReduceOp.MAX, group)
        target = labels[start:end]
        in_shard = (target >= lo) & (target < hi)
        idx = (target - lo).clamp(0, hi - lo - 1)
        sum_exp, target_logit = stats(logits, local_max, idx, in_shard)
        both = torch.stack([sum_exp, target_logit])
        _all_reduce(both, dist.ReduceOp.SUM, group)
        chunk_lse = both[0].log()
        loss[start:end] = chunk_lse - both[1]
        lse[start:end] = chunk_lse + local_max


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_size: int = DEFAULT_CHUNK_SIZE, group=None,
                          fused: bool = False) -> torch.Tensor:
    """Per-token loss of `hidden @ weight.T` against `labels`, never holding full logits.

    hidden [s, b, h] (already replicated over the TP group), weight [V/tp, h] (this rank's
    vocabulary shard; the shards are in rank order), labels [b, s]. Returns loss [b, s] in fp32,
    equal to megatron's vocab_parallel_cross_entropy on the full logits.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size}: must be a positive number of tokens "
                         "(training.loss_chunk_size)")
    s, b, h = hidden.shape
    # Flatten in [s, b] order: a view of the hidden states, and its gradient stays contiguous
    # (the TP all-reduce in the caller's copy-to-region backward needs that).
    flat_hidden = hidden.reshape(s * b, h)
    flat_labels = labels.transpose(0, 1).reshape(s * b).long()
    loss = _ChunkedCrossEntropy.apply(flat_hidden, weight, flat_labels, chunk_size, group, fused)
    return loss.view(s, b).transpose(0, 1)


def full_logits_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                              labels: torch.Tensor) -> torch.Tensor:
    """The unchunked reference (single rank, full vocabulary): [s,b,h] -> loss [b,s]."""
    logits = torch.matmul(hidden, weight.t()).float()  # [s, b, V]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.transpose(0, 1).reshape(-1).long(),
        reduction="none")
    return loss.view(hidden.shape[0], hidden.shape[1]).transpose(0, 1)


def _gpt_model_class():
    from megatron.core.models.gpt import GPTModel

    return GPTModel


class ChunkedLossGPTModel(_gpt_model_class()):
    """GPTModel whose training loss runs through `chunked_cross_entropy`.

    Everything else (parameters, state-dict keys, inference, logits without labels) is
    GPTModel's own, so checkpoints and conversion see an ordinary GPTModel.
    """

    def __init__(self, *args, loss_chunk_size: int = DEFAULT_CHUNK_SIZE, fused_loss: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_chunk_size = loss_chunk_size
        self.fused_loss = fused_loss

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        chunkable = (labels is not None and self.post_process and not self.mtp_process
                     and self.config.mtp_num_layers is None
                     and kwargs.get("inference_context") is None
                     and not self.share_embeddings_and_output_weights)
        if not chunkable:
            return super()._postprocess(hidden_states, input_ids, position_ids, labels,
                                        *args, **kwargs)
        from megatron.core.tensor_parallel import (
            copy_to_tensor_model_parallel_region,
            gather_from_sequence_parallel_region,
        )

        layer = self.output_layer
        group = layer.tp_group
        if layer.sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(hidden_states, group=group)
        elif dist.get_world_size(group) > 1:
            hidden_states = copy_to_tensor_model_parallel_region(hidden_states, group=group)
        return chunked_cross_entropy(hidden_states, layer.weight, labels,
                                     self.loss_chunk_size, group, self.fused_loss)
