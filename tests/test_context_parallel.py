"""Context-parallel bookkeeping without communication: padding, the load-balanced split,
cu_seqlens, the TE settings and the layout rules."""
import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _get_thd_freqs_on_this_cp_rank

from megatron_prolong.config import ConfigError, load_config, validate
from megatron_prolong.model.context_parallel import (
    cp_comm_bytes_per_layer,
    cp_gather_order,
    cp_pad_multiple,
    cp_partition_indices,
    kv_replication,
    pad_documents,
    split_batch_for_cp_rank,
    te_context_parallel_kwargs,
)


def packed_row(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    tokens = torch.randint(1, 100, (1, total), generator=g)
    loss_mask = torch.ones(1, total)
    loss_mask[0, cu[1:].long() - 1] = 0
    return dict(tokens=tokens, labels=torch.roll(tokens, -1, 1), loss_mask=loss_mask,
                domain_ids=torch.randint(0, 3, (1, total), generator=g),
                cu_seqlens=cu, max_seqlen=max(lengths), num_loss_tokens=int(loss_mask.sum()))


def test_pad_multiple_follows_the_rule():
    assert cp_pad_multiple(1, 4, True) == 1  # no CP: only the row length matters
    assert cp_pad_multiple(2) == 4
    assert cp_pad_multiple(4, 2, False) == 8
    assert cp_pad_multiple(4, 2, True) == 16


def test_pad_documents_keeps_tokens_and_pads_each_document_end():
    row = packed_row([5, 8, 3])
    padded = pad_documents(row, 4)
    assert padded["cu_seqlens_padded"].tolist() == [0, 8, 16, 20]
    assert padded["cu_seqlens"].tolist() == [0, 5, 13, 16]  # true lengths stay
    assert padded["max_seqlen"] == 8
    for key in ("tokens", "labels", "loss_mask", "domain_ids"):
        got = padded[key][0]
        want = row[key][0]
        assert torch.equal(got[0:5], want[0:5]) and torch.equal(got[8:16], want[5:13])
        assert torch.equal(got[16:19], want[13:16])
        assert not got[[5, 6, 7, 19]].any()  # pads are zero, loss_mask 0
    assert padded["num_loss_tokens"] == row["num_loss_tokens"]
    assert pad_documents(padded, 4) is padded  # already valid: untouched
    assert pad_documents(row, 1) is row


def test_repadding_moves_tokens_from_an_existing_padded_layout():
    row = packed_row([5, 8, 3])
    twice = pad_documents(pad_documents(row, 2), 8)
    once = pad_documents(row, 8)
    assert twice["cu_seqlens_padded"].tolist() == once["cu_seqlens_padded"].tolist()
    assert torch.equal(twice["tokens"], once["tokens"])


@pytest.mark.parametrize("cp", [2, 4])
def test_split_is_megatrons_load_balanced_split(cp):
    lengths = [8 * cp, 2 * cp, 6 * cp]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    seen = []
    for r in range(cp):
        idx = cp_partition_indices(cu, cp, r)
        for d, length in enumerate(lengths):
            start, chunk = int(cu[d]), length // (2 * cp)
            want = list(range(start + r * chunk, start + (r + 1) * chunk)) + list(
                range(start + (2 * cp - 1 - r) * chunk, start + (2 * cp - r) * chunk))
            mine = [int(i) for i in idx if start <= i < start + length]
            assert mine == want, (r, d)
            # megatron's THD RoPE hands this rank exactly these in-document positions
            freqs = torch.arange(64 * cp)
            x = torch.empty(length // cp)
            rope_positions = _get_thd_freqs_on_this_cp_rank(r, cp, x, freqs).tolist()
            assert rope_positions == [i - start for i in mine]
        seen.append(idx)
    order = cp_gather_order(cu, cp)
    assert torch.equal(order, torch.cat(seen))
    assert sorted(order.tolist()) == list(range(int(cu[-1])))


def test_zero_length_documents_are_skipped():
    cu = torch.tensor([0, 4, 4, 12], dtype=torch.int32)
    assert cp_partition_indices(cu, 2, 0).tolist() == [0, 3, 4, 5, 10, 11]
    assert cp_partition_indices(cu, 2, 1).tolist() == [1, 2, 6, 7, 8, 9]


def test_split_batch_slices_every_per_token_tensor_and_keeps_cu_global():
    row = packed_row([7, 12, 1, 20])
    cp = 4
    shares = [split_batch_for_cp_rank(row, cp, r) for r in range(cp)]
    padded = pad_documents(row, 2 * cp)
    for share in shares:
        assert share["tokens"].shape[1] == padded["tokens"].shape[1] // cp
        assert torch.equal(share["cu_seqlens"], row["cu_seqlens"])
        assert torch.equal(share["cu_seqlens_padded"], padded["cu_seqlens_padded"])
        assert share["max_seqlen"] == 24
        pos = share["position_ids"][0]
        for key in ("tokens", "labels", "loss_mask", "domain_ids"):
            assert torch.equal(share[key][0], padded[key][0][pos])
    assert sum(s["num_loss_tokens"] for s in shares) == row["num_loss_tokens"]
    # the length-1 document's only token lands on rank 0
    assert shares[0]["position_ids"][0].tolist().count(int(padded["cu_seqlens_padded"][2])) == 1
    one = split_batch_for_cp_rank(row, 1, 0)
    assert torch.equal(one["tokens"], row["tokens"]) and one["position_ids"].shape == (1, 40)


def test_a_rank_with_only_masked_tokens_counts_zero():
    row = packed_row([32])
    row["loss_mask"][:] = 0
    row["loss_mask"][0, 8:24] = 1  # the middle half: chunks 1 and 2 of 4 (cp=2)
    shares = [split_batch_for_cp_rank(row, 2, r) for r in range(2)]
    assert shares[0]["num_loss_tokens"] == 0 and shares[1]["num_loss_tokens"] == 16


def test_kv_replication_only_as_far_as_needed():
    assert kv_replication(groups=4, heads=8, cp=2) == 1
    assert kv_replication(groups=2, heads=8, cp=4) == 2
    assert kv_replication(groups=1, heads=8, cp=8) == 8
    assert kv_replication(groups=2, heads=6, cp=3) == 3
    with pytest.raises(ValueError, match="context=4 must divide the attention heads"):
        kv_replication(groups=2, heads=6, cp=4)


def test_te_settings_from_config():
    assert te_context_parallel_kwargs(1, "p2p") == {}
    assert te_context_parallel_kwargs(4, "allgather") == {"cp_comm_type": "all_gather"}
    assert te_context_parallel_kwargs(8, "a2a") == {"cp_comm_type": "a2a"}
    assert te_context_parallel_kwargs(16, "a2a+p2p") == {
        "cp_comm_type": "a2a+p2p", "hierarchical_context_parallel_sizes": [8, 2]}
    with pytest.raises(ValueError, match="parallel.cp_comm_type='ring'"):
        te_context_parallel_kwargs(2, "ring")


def test_te_transformer_config_carries_the_cp_settings():
    from megatron_prolong.model.llama import to_transformer_config

    cfg = load_config(None, ["model.preset=tiny", "parallel.context=2",
                             "parallel.cp_comm_type=allgather"])
    te = to_transformer_config(cfg.model, cfg.parallel, use_te=True)
    local = to_transformer_config(cfg.model, cfg.parallel, use_te=False)
    assert te.cp_comm_type == "all_gather" and te.context_parallel_size == 2
    assert local.cp_comm_type is None  # the local path does its own (Ulysses) exchange


@pytest.mark.parametrize("overrides,world,needle", [
    (["parallel.context=16"], 16, "parallel.context=16: must divide the attention heads"),
    (["parallel.tensor=2", "parallel.context=8"], 16,
     "parallel.context=8: must divide the attention heads"),
    (["parallel.context=4", "training.seq_length=1028"], 4, "must be divisible by 8"),
    (["parallel.context=2", "parallel.tensor=2", "parallel.sequence_parallel=true",
      "training.seq_length=1028"], 4, "must be divisible by 8"),
])
def test_bad_cp_layouts_fail_early(overrides, world, needle):
    cfg = load_config(None, ["model.preset=tiny", "training.global_batch_size=16"] + overrides)
    with pytest.raises(ConfigError, match=needle):
        validate(cfg, world)


def test_heads_rule_follows_the_comm_type():
    base = ["model.preset=tiny", "training.global_batch_size=16", "parallel.context=16"]
    # TE's ring and all-gather split only the sequence: 16 ranks over 8 heads are fine there
    layout = validate(load_config(None, base + ["model.attention_backend=te",
                                                "parallel.cp_comm_type=p2p"]), 16)
    assert layout.cp == 16 and layout.cp_hierarchy is None
    with pytest.raises(ConfigError, match="parallel.context=16: must divide the attention heads"):
        validate(load_config(None, base + ["model.attention_backend=te",
                                           "parallel.cp_comm_type=a2a"]), 16)
    # a2a+p2p: all-to-all over the 8 GPUs of a node, ring across 2 nodes
    layout = validate(load_config(None, base + ["model.attention_backend=te",
                                                "parallel.cp_comm_type=a2a+p2p"]), 16)
    assert layout.cp_hierarchy == [8, 2]


def test_planner_volumes_for_512k_on_a_node():
    """The figures quoted in docs/context_parallel.md (Llama-3-8B, bf16, cp=8)."""
    volume = {c: cp_comm_bytes_per_layer(524288, 8, heads=32, groups=8, head_dim=128,
                                         comm_type=c) for c in ("a2a", "p2p", "allgather")}
    assert volume == {"a2a": 2_348_810_240, "p2p": 5_637_144_576, "allgather": 3_758_096_384}
    # Ulysses per-GPU volume falls as cp grows; the ring's does not
    assert cp_comm_bytes_per_layer(524288, 4, 32, 8, 128, "a2a") > volume["a2a"]
    assert cp_comm_bytes_per_layer(524288, 4, 32, 8, 128, "p2p") < volume["p2p"]
    assert cp_comm_bytes_per_layer(524288, 1, 32, 8, 128, "a2a") == 0
