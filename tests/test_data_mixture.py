import os

import numpy as np
import pytest

from megatron_prolong.data.batching import RankBatchIterator, smart_batch_plan
from megatron_prolong.data.config import DataConfig, DomainConfig
from megatron_prolong.data.indexed import DataFileError, DocumentPool
from megatron_prolong.data.mixture import build_pretraining_dataset
from megatron_prolong.data.streams import DomainStream
from test_data_helpers import random_docs, write_docs

PAD = 258


def tagged_docs(lengths):
    """Doc i = [i, i, ..., i] so every token tells which document it came from."""
    return [np.full(n, i, dtype=np.int64) for i, n in enumerate(lengths)]


def stream(tmp_path, lengths, mode, L, min_len=None, seed=0, overflow="truncate", masks=None):
    prefix = write_docs(str(tmp_path / f"d{mode}"), tagged_docs(lengths), masks=masks)
    return DomainStream("d", DocumentPool([prefix]), L, mode, min_len, seed, PAD, overflow)


def test_long_mode_drops_short_docs_and_cuts_long_ones(tmp_path):
    lengths = [10, 40, 100, 15, 64, 130]
    st = stream(tmp_path, lengths, "long", L=32)  # min_doc_length defaults to seq_length
    kept = {1, 2, 4, 5}
    assert set(st.docs.tolist()) == kept
    n = sum(lengths[i] for i in kept) // 32  # one epoch's worth of full samples
    stream_tokens = np.concatenate([st.sample(k).tokens for k in range(n)])
    # consecutive samples continue the same permuted stream: each doc appears as one run
    runs = [int(v) for v in stream_tokens[np.r_[0, np.flatnonzero(np.diff(stream_tokens)) + 1]]]
    assert sorted(runs) == sorted(kept)
    for k in range(n):
        s = st.sample(k)
        assert len(s.tokens) == 32 and s.cu_seqlens[-1] == 32
        for a, b in zip(s.cu_seqlens[:-1], s.cu_seqlens[1:]):  # segments are single docs
            assert len(set(s.tokens[a:b].tolist())) == 1
        assert s.loss_mask.sum() == 32 - (len(s.cu_seqlens) - 1)


def test_short_mode_carries_tail_over_and_loses_nothing(tmp_path):
    lengths = [7, 3, 12, 5, 9, 1, 11]  # 48 tokens = 3 samples of 16
    st = stream(tmp_path, lengths, "short", L=16)
    toks = np.concatenate([st.sample(k).tokens for k in range(3)])
    counts = np.bincount(toks, minlength=len(lengths))
    assert counts.tolist() == lengths  # every token exactly once in an epoch
    # the 4th sample starts epoch 1 with a different permutation
    assert st.sample(3).seq_length == 16


def test_sft_truncate_and_drop(tmp_path):
    lengths = [6, 5, 20, 4, 7]
    masks = [np.ones(n, dtype=np.uint8) for n in lengths]
    st = stream(tmp_path, lengths, "sft", L=10, masks=masks)
    seen = []
    for k in range(4):
        pieces = st.pieces(k)
        assert pieces[0].offset == 0 and all(p.offset == 0 for p in pieces)
        assert sum(p.length for p in pieces) <= 10
        seen += [p.doc for p in pieces]
    assert set(seen) == set(range(5))  # truncate keeps every conversation (cut at the end)

    st2 = stream(tmp_path, lengths, "sft", L=10, overflow="drop", masks=masks)
    assert 2 not in st2.docs.tolist()  # longer than seq_length: dropped
    for k in range(3):
        ps = st2.pieces(k)
        assert all(p.length == lengths[p.doc] for p in ps)  # never truncated
        s = st2.sample(k)
        if sum(p.length for p in ps) < 10:
            assert s.tokens[-1] == PAD and s.loss_mask[-1] == 0


def test_sft_needs_loss_mask(tmp_path):
    with pytest.raises(ValueError, match="loss mask"):
        stream(tmp_path, [5, 5], "sft", L=8)


def _mixture(tmp_path, weights, seed=1, L=256, smart=True):
    rng = np.random.default_rng(0)
    doms = []
    for name, (lo, hi) in zip(weights, [(20, 400), (300, 1200), (5, 50), (50, 100)]):
        prefix = write_docs(str(tmp_path / name), random_docs(rng, 50, lo, hi))
        doms.append(DomainConfig(name, [prefix], weights[name]))
    return build_pretraining_dataset(DataConfig(domains=doms, seed=seed, smart_batching=smart),
                                     L, mode="short")


def test_mixture_token_shares_within_one_point(tmp_path):
    weights = {"code": 0.3, "books": 0.3, "web": 0.36, "math": 0.04}
    ds = _mixture(tmp_path, weights)
    tokens = {k: 0 for k in weights}
    for i in range(1000):
        s = ds[i]
        tokens[s.domain] += int(s.cu_seqlens[-1])
    total = sum(tokens.values())
    for name, w in weights.items():
        assert abs(tokens[name] / total - w) < 0.01, (name, tokens[name] / total, w)


def test_sampling_is_deterministic_and_seeded(tmp_path):
    w = {"code": 0.5, "books": 0.5}
    a, b = _mixture(tmp_path, w, seed=7), _mixture(tmp_path, w, seed=7)
    c = _mixture(tmp_path, w, seed=8)
    idx = [0, 1, 5, 17, 123, 999, 4000]
    for i in idx:  # also out of order: random access needs no state
        sa, sb = a[i], b[i]
        assert np.array_equal(sa.tokens, sb.tokens) and np.array_equal(sa.cu_seqlens,
                                                                      sb.cu_seqlens)
    assert any(not np.array_equal(a[i].tokens, c[i].tokens) for i in idx)


def test_resume_yields_exactly_the_uninterrupted_batches(tmp_path):
    w = {"code": 0.5, "books": 0.3, "web": 0.2}
    ds = _mixture(tmp_path, w)
    full = RankBatchIterator(ds, 8, 2, dp_rank=1, dp_size=2)
    uninterrupted = [next(full) for _ in range(5)]
    resumed_ds = _mixture(tmp_path, w)  # a fresh process after restart
    resumed = RankBatchIterator(resumed_ds, 8, 2, dp_rank=1, dp_size=2, consumed_samples=3 * 8)
    for step in (3, 4):
        got = next(resumed)
        for x, y in zip(got, uninterrupted[step]):
            assert x["tokens"].equal(y["tokens"]) and x["cu_seqlens"].equal(y["cu_seqlens"])
            assert x["domains"] == y["domains"]
    assert resumed.consumed_samples == 5 * 8


def test_smart_batch_plan_orders_by_cost_and_keeps_every_sample():
    costs = [5, 90, 10, 70, 30, 60, 20, 80]
    plan = smart_batch_plan(costs, dp_size=2, micro_batch_size=1)
    # sorted desc: 1(90) 7(80) 3(70) 5(60) 4(30) 6(20) 2(10) 0(5); mb c -> rank c%2, step c//2
    assert plan == [[[1], [3], [4], [2]], [[7], [5], [6], [0]]]
    plan2 = smart_batch_plan(costs, dp_size=2, micro_batch_size=2)
    assert plan2 == [[[1, 7], [4, 6]], [[3, 5], [2, 0]]]
    flat = sorted(p for rank in plan2 for mb in rank for p in mb)
    assert flat == list(range(8))
    off = smart_batch_plan(costs, dp_size=2, micro_batch_size=2, enabled=False)
    assert off == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]


def test_smart_batching_balances_ranks_in_the_loader(tmp_path):
    ds = _mixture(tmp_path, {"code": 0.5, "books": 0.5})
    G, dp = 16, 4
    per_rank = [RankBatchIterator(ds, G, 1, r, dp).plan_for(0) for r in range(dp)]
    got = sorted(i for r in per_rank for mb in r for i in mb)
    assert got == list(range(G))  # nothing lost or duplicated

    def cost(i):
        lens = ds.segment_lengths(i)
        return int((lens ** 2).sum())

    for step in range(G // dp):
        step_costs = [cost(per_rank[r][step][0]) for r in range(dp)]
        later = [cost(per_rank[r][s][0]) for r in range(dp) for s in range(step + 1, G // dp)]
        assert min(step_costs) >= max(later, default=0)  # descending by step
    batch = next(iter(RankBatchIterator(ds, G, 2, 0, 2, pad_to_multiple_of=8)))
    assert len(batch) == 4  # 16 samples / 2 ranks / micro-batch 2
    row = batch[0]
    assert row["tokens"].shape[1] % 8 == 0 and int(row["cu_seqlens"][-1]) == 2 * 256
    assert int(row["cu_seqlens_padded"][-1]) == row["tokens"].shape[1]


def test_proportion_zero_domain_is_skipped_and_names_resolved(tmp_path, monkeypatch):
    prefix = write_docs(str(tmp_path / "a"), [np.arange(50)])
    monkeypatch.setenv("MYDATA", str(tmp_path))
    cfg = DataConfig(domains=[DomainConfig("a", ["${MYDATA}/a"], 2.0),
                              DomainConfig("b", ["${MYDATA}/missing"], 0.0)])
    ds = build_pretraining_dataset(cfg, 16)
    assert ds.domain_names == ["a"] and ds.weights.tolist() == [1.0]
    assert ds[3].domain == "a"
    with pytest.raises(ValueError, match=r"\$\{NOPE\} is not set"):
        DataConfig(domains=[DomainConfig("a", ["${NOPE}/a"], 1.0)]).resolved_domains()
    assert prefix


def test_token_id_outside_vocab_is_an_error(tmp_path):
    prefix = write_docs(str(tmp_path / "big"), [np.array([1, 2, 3, 1000, 4])], vocab_size=2048)
    cfg = DataConfig(domains=[DomainConfig("x", [prefix], 1.0)])
    with pytest.raises(DataFileError, match=r"sequence 0 \(of 1\) holds token id 1000, outside "
                                            r"the vocabulary \[0, 512\)"):
        build_pretraining_dataset(cfg, 4)  # found when the dataset is opened
    ds = build_pretraining_dataset(cfg, 4, scan_token_ids=False)  # and at every read
    with pytest.raises(DataFileError, match="token id 1000 >= vocab size 512"):
        ds[0]


def test_missing_and_truncated_files_are_reported(tmp_path):
    prefix = write_docs(str(tmp_path / "t"), [np.arange(100), np.arange(50)])
    with pytest.raises(DataFileError, match="missing .*nothere.idx"):
        DocumentPool([str(tmp_path / "nothere")])
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(prefix + ".bin") - 10)
    with pytest.raises(DataFileError, match="truncated or mismatched"):
        DocumentPool([prefix])
    prefix2 = write_docs(str(tmp_path / "u"), [np.arange(100)])
    with open(prefix2 + ".idx", "r+b") as f:
        f.truncate(40)
    with pytest.raises(DataFileError, match="u.idx: truncated"):
        DocumentPool([prefix2])
