import numpy as np
import pytest
import torch

from megatron_prolong.data.packing import attention_cost, build_sample, collate_packed

PAD = 258


def test_labels_never_cross_documents():
    a, b = np.array([1, 2, 3]), np.array([4, 5])
    s = build_sample([a, b], 8, "code", PAD)
    assert s.tokens.tolist() == [1, 2, 3, 4, 5, PAD, PAD, PAD]
    assert s.cu_seqlens.tolist() == [0, 3, 5, 8]
    assert s.cu_seqlens.dtype == np.int32 and s.tokens.dtype == np.int64
    assert s.labels.tolist() == [2, 3, PAD, 5, PAD, PAD, PAD, PAD]
    assert s.loss_mask.tolist() == [1, 1, 0, 1, 0, 0, 0, 0]
    assert s.loss_mask.dtype == np.float32 and s.domain == "code"


def test_sft_target_mask_shifts_to_predicting_position():
    # BOS user-token assistant-token eot : targets are tokens 2 (assistant) and 3 (eot)
    toks = np.array([256, 10, 20, 261])
    target = np.array([0, 0, 1, 1], dtype=np.uint8)
    s = build_sample([toks], 4, "sft", PAD, [target])
    # position i predicts tokens[i+1]; loss on when that token is a target; last pos never
    assert s.loss_mask.tolist() == [0, 1, 1, 0]


def test_build_sample_rejects_overflow():
    with pytest.raises(ValueError, match="more than seq_length"):
        build_sample([np.arange(5)], 4, "x", PAD)


def test_attention_cost():
    assert attention_cost([0, 3, 5, 8]) == 9 + 4 + 9
    assert attention_cost(np.array([0, 65536], dtype=np.int32)) == 65536 ** 2


def test_collate_concatenates_into_one_row():
    s1 = build_sample([np.array([1, 2, 3]), np.array([4])], 4, "a", PAD)
    s2 = build_sample([np.array([5, 6, 7, 8])], 4, "b", PAD)
    b = collate_packed([s1, s2])
    assert b["tokens"].shape == (1, 8) and b["tokens"].dtype == torch.int64
    assert b["tokens"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert b["labels"].tolist() == [[2, 3, PAD, PAD, 6, 7, 8, PAD]]
    assert b["cu_seqlens"].tolist() == [0, 3, 4, 8] and b["cu_seqlens"].dtype == torch.int32
    assert b["cu_seqlens_padded"] is None
    assert b["max_seqlen"] == 4 and b["domains"] == ["a", "b"]
    assert b["num_loss_tokens"] == 2 + 0 + 3
    assert b["loss_mask"].dtype == torch.float32


def test_collate_pads_each_document_for_context_parallel():
    s1 = build_sample([np.array([1, 2, 3]), np.array([4])], 4, "a", PAD)
    s2 = build_sample([np.array([5, 6, 7, 8])], 4, "b", PAD)
    b = collate_packed([s1, s2], pad_to_multiple_of=4)
    P = PAD
    assert b["cu_seqlens"].tolist() == [0, 3, 4, 8]          # true lengths
    assert b["cu_seqlens_padded"].tolist() == [0, 4, 8, 12]  # padded layout
    assert b["tokens"].tolist() == [[1, 2, 3, P, 4, P, P, P, 5, 6, 7, 8]]
    assert b["labels"].tolist() == [[2, 3, P, P, P, P, P, P, 6, 7, 8, P]]
    assert b["loss_mask"].tolist() == [[1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0]]
    assert b["num_loss_tokens"] == 5 and b["max_seqlen"] == 4
    assert b["tokens"].shape[1] % 4 == 0
