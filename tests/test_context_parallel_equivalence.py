"""Context parallelism equals no parallelism: losses and gradients on 4 CPU processes (gloo).

One spawned run (imports cost ~8 s per spawn) checks the Ulysses exchange on raw tensors, then
trains the tiny Llama from the same weights under every layout and returns losses and full
(TP-gathered, globally named) gradients for the test process to compare.
"""
import re

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed

LAYOUTS = [  # override sets; the first is the reference
    (),
    ("parallel.context=2",),
    ("parallel.context=4",),
    ("parallel.tensor=2", "parallel.context=2"),
    ("parallel.pipeline=2", "parallel.context=2"),
]  # sequence parallelism needs TE/apex norms (megatron's torch norm refuses it): gpu tests
# 2 KV groups: cp=4 and tp=2 x cp=2 replicate KV heads inside the model (x2 each; cp=2
# does not); the raw Ulysses check covers more head/group shapes.
OVERRIDES = ["model.preset=tiny", "model.num_query_groups=2", "training.seq_length=128",
             "training.global_batch_size=4", "optimizer.lr=3e-3", "optimizer.clip_grad=0",
             "training.precision=fp32", "training.loss_chunk_size=48"]


def cp_rows(seq_length: int, vocab: int) -> list[dict]:
    """Packed rows whose documents cross the CP split points once padded, plus the edge cases:
    a 1-token document, and a row whose loss sits only in the middle half of one document (so
    with cp=2 rank 0 holds no loss token at all)."""
    g = torch.Generator().manual_seed(7)
    rows = []
    for lengths, middle_only in (([37, 50, 41], False), ([128], True), ([1, 90, 37], False),
                                 ([19, 64, 3, 42], False)):
        tokens = torch.randint(0, vocab, (seq_length,), generator=g)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        loss_mask = torch.ones(seq_length)
        loss_mask[cu[1:].long() - 1] = 0
        if middle_only:
            loss_mask[: seq_length // 4] = 0
            loss_mask[3 * seq_length // 4:] = 0
        rows.append(dict(tokens=tokens[None], labels=torch.roll(tokens, -1)[None],
                         loss_mask=loss_mask[None], cu_seqlens=cu, max_seqlen=max(lengths)))
    return rows


def ulysses_matches_full_attention() -> dict:
    """ulysses_attention over the world group (cp=4) vs attention on the whole row."""
    from megatron_prolong.model.attention import attention_per_document
    from megatron_prolong.model.context_parallel import (cp_partition_indices, pad_documents,
                                                         ulysses_attention)

    cp, rank = dist.get_world_size(), dist.get_rank()
    errors = {}
    for heads, groups in ((8, 2), (8, 8), (4, 1)):  # replication x2, none, x4
        g = torch.Generator().manual_seed(heads * 10 + groups)
        cu = pad_documents(dict(tokens=torch.zeros(1, 70), cu_seqlens=torch.tensor(
            [0, 13, 51, 70], dtype=torch.int32)), 2 * cp)["cu_seqlens_padded"]
        total = int(cu[-1])
        q = torch.randn(total, heads, 16, generator=g, requires_grad=True)
        k = torch.randn(total, groups, 16, generator=g, requires_grad=True)
        v = torch.randn(total, groups, 16, generator=g, requires_grad=True)
        grad_out = torch.randn(total, heads, 16, generator=g)
        ref = attention_per_document(q, k, v, cu, 0.25)
        ref.backward(grad_out)
        idx = cp_partition_indices(cu, cp, rank)
        ql, kl, vl = (x.detach()[idx].requires_grad_() for x in (q, k, v))
        out = ulysses_attention(ql, kl, vl, cu, dist.group.WORLD,
                                lambda a, b, c: attention_per_document(a, b, c, cu, 0.25))
        out.backward(grad_out[idx])
        errors[(heads, groups)] = max(
            float((out - ref[idx]).abs().max()),
            *(float((x.grad - full.grad[idx]).abs().max()) for x, full in
              ((ql, q), (kl, k), (vl, v))))
    return errors


def _full_grads(chunk, layout, num_layers: int) -> dict:
    """name -> gradient of the whole parameter (TP shards gathered), layer numbers global."""
    from megatron.core import parallel_state as ps

    tp_group = ps.get_tensor_model_parallel_group()
    offset = ps.get_pipeline_model_parallel_rank() * (num_layers // layout.pp)
    grads = {}
    for name, param in chunk.module.named_parameters():
        grad = param.main_grad.detach().clone()
        if layout.tp > 1 and getattr(param, "tensor_model_parallel", False):
            parts = [torch.empty_like(grad) for _ in range(layout.tp)]
            dist.all_gather(parts, grad, group=tp_group)
            if name.endswith("linear_fc1.weight"):  # each shard is [gate_r; up_r]
                halves = [p.chunk(2, dim=0) for p in parts]
                parts = [h[0] for h in halves] + [h[1] for h in halves]
                grad = torch.cat(parts, dim=0)
            else:
                grad = torch.cat(parts, dim=param.partition_dim)
        name = re.sub(r"layers\.(\d+)\.", lambda m: f"layers.{int(m.group(1)) + offset}.", name)
        grads[name] = grad
    return grads


def train_under_layouts(layouts, overrides, weights_dir, device="cpu", check_ulysses=True):
    """On every rank: train two steps from the same weights under each layout (a tuple of
    key=value overrides); return {layout: losses, loss tokens, full gradients of step 1}."""
    from megatron.core import parallel_state as ps

    from megatron_prolong.config import load_config
    from megatron_prolong.training.parallel import destroy_model_parallel, init_distributed
    from megatron_prolong.training.step import train_step
    from parallel_cases import setup_from_shared_weights

    rt = init_distributed(device)
    results = {"ulysses": ulysses_matches_full_attention() if check_ulysses else {}}
    for i, layout_overrides in enumerate(layouts):
        cfg = load_config(None, list(overrides) + list(layout_overrides))
        layout, state = setup_from_shared_weights(cfg, rt, weights_dir, first=i == 0)
        rows = cp_rows(cfg.training.seq_length, cfg.model.vocab_size)
        per = layout.num_microbatches
        dp_rank = ps.get_data_parallel_rank()
        mine = rows[dp_rank * per:(dp_rank + 1) * per]
        first = train_step(state, mine)
        grads = {k: v.float().cpu() for k, v in
                 _full_grads(state.model[0], layout, cfg.model.num_layers).items()}
        second = train_step(state, mine)
        results[layout_overrides] = dict(losses=[first.loss, second.loss],
                                         tokens=first.loss_tokens, grads=grads)
        destroy_model_parallel()
    return results


def compare_layouts(per_rank, layouts, loss_rtol, grad_rtol):
    """Every layout's losses, loss-token counts and gradients against the first layout's."""
    reference = per_rank[0][layouts[0]]
    assert all(torch.isfinite(torch.tensor(reference["losses"])))
    assert reference["losses"][1] < reference["losses"][0]
    want_grads = {}
    for result in per_rank:  # pipeline stages hold different parameters
        want_grads.update(result[layouts[0]]["grads"])
    for layout in layouts[1:]:
        got_grads = {}
        for rank, result in enumerate(per_rank):
            got = result[layout]
            assert got["tokens"] == reference["tokens"], layout
            for step, (a, b) in enumerate(zip(got["losses"], reference["losses"])):
                assert abs(a - b) / abs(b) <= loss_rtol, (layout, rank, step, a, b)
            got_grads.update(got["grads"])
        assert got_grads.keys() == want_grads.keys(), layout
        for name, want in want_grads.items():
            rel = float((got_grads[name] - want).abs().max() / want.abs().max())
            assert rel <= grad_rtol, (layout, name, rel)


@pytest.mark.slow
def test_context_parallel_equals_no_parallelism(tmp_path):
    per_rank = run_distributed(train_under_layouts, 4, LAYOUTS, OVERRIDES, str(tmp_path / "w"))
    for rank, result in enumerate(per_rank):
        for shape, err in result["ulysses"].items():
            assert err < 1e-5, (rank, shape, err)
    compare_layouts(per_rank, LAYOUTS, loss_rtol=1e-5, grad_rtol=1e-5)
