"""Transformer Engine path fixes from upstream bugs, where the CPU can check them: one offsets
tensor object when no document is padded (TE issue 3487), masked losses zeroed with `where`
(NaN x 0 is NaN), every document padded to a multiple of 2 x cp."""
import math

import torch

from megatron_prolong.evaluation.forward import validation_sums
from megatron_prolong.model.context_parallel import (packed_seq_params, share_unpadded_offsets,
                                                     split_batch_for_cp_rank)
from megatron_prolong.training.step import masked_token_loss


def _row(lengths):
    t = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return {"tokens": torch.arange(t)[None], "labels": torch.arange(t)[None],
            "loss_mask": torch.ones(1, t), "cu_seqlens": cu}


def test_unpadded_rows_pass_one_offsets_tensor():
    plain = packed_seq_params(_row([8, 4]), "cpu")
    assert plain.cu_seqlens_q_padded is plain.cu_seqlens_q
    assert plain.cu_seqlens_kv_padded is plain.cu_seqlens_q
    # Documents already a multiple of 2 x cp: the CP split keeps equal values in a copy, which
    # must come back as the same object.
    split = split_batch_for_cp_rank(_row([8, 4]), cp=2, rank=0)
    params = packed_seq_params(share_unpadded_offsets(split), "cpu")
    assert params.cu_seqlens_q_padded is params.cu_seqlens_q
    # Real padding keeps its own tensor with the padded offsets.
    padded = split_batch_for_cp_rank(_row([7, 4]), cp=2, rank=0)
    params = packed_seq_params(padded, "cpu")
    assert params.cu_seqlens_q_padded is not params.cu_seqlens_q
    assert params.cu_seqlens_q_padded.tolist() == [0, 8, 12]
    assert all(n % 4 == 0 for n in params.cu_seqlens_q_padded.diff().tolist())  # 2 x cp


def test_nan_in_a_masked_position_leaves_the_loss_finite():
    losses = torch.tensor([1.0, float("nan"), 2.0, float("inf")])
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    loss_sum, count, report = masked_token_loss(mask, losses, torch.tensor([0, 1, 0, 1]), 2)
    assert loss_sum.item() == 3.0 and count.item() == 2
    assert torch.isfinite(report["domain loss"]).all()
    batch = {"eval_sizes": (1, 1), "loss_mask": mask, "eval_domain": torch.zeros(4),
             "eval_bucket": torch.zeros(4)}
    sums = validation_sums(batch, losses)
    assert math.isfinite(sums.sum().item()) and sums[0, 0].item() == 3.0
