"""The local path's kernels: FlexAttention's document BlockMask (the mask the compiled CUDA
kernel uses) against the per-document reference, kernel choice and its configuration rules.

FlexAttention runs uncompiled on CPU with the same mask_mod; PyTorch refuses its backward on CPU
only by an up-front device check (its eager backward is plain PyTorch arithmetic), which
`cpu_flex_backward` lifts for these tests. The uncompiled path reads only mask_mod, while the
compiled kernel skips tiles by the BlockMask's lists: those are checked token by token too.
"""
import pytest
import torch

from megatron_prolong.config import ConfigError, load_config, validate
from megatron_prolong.model import attention
from megatron_prolong.model.attention import (attention_per_document, document_block_mask,
                                              flex_document_attention, resolve_kernel,
                                              varlen_causal_attention)

# (document lengths, tile size): several documents per tile and tiles inside one document, a
# one-token and a zero-length document, rows that do and do not fill their last tile.
LAYOUTS = [
    ([37, 90, 1, 64, 128], 16),
    ([5, 0, 700, 13], 64),
    ([256], 128),
    ([1] * 40, 16),
    ([130, 126, 3], 128),
]


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _reference_mask(lengths):
    """[t, t] causal mask inside documents, from the lengths alone."""
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(doc.numel())
    return (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])


def _tiles_to_tokens(num, idx, full_num, full_idx, mask_mod, total, tile, by_query):
    """The token mask a block-sparse kernel computes from one side's tile lists: listed partial
    tiles through mask_mod, full tiles entirely, everything else nothing."""
    n = -(-total // tile)
    pos = torch.arange(n * tile)
    allowed = torch.zeros(n * tile, n * tile, dtype=torch.bool)
    dense = mask_mod(0, 0, pos[:, None], pos[None, :])
    for row in range(n):
        for lists, partial in (((num, idx), True), ((full_num, full_idx), False)):
            count, indices = lists[0][0, 0, row], lists[1][0, 0, row]
            for col in indices[:count].tolist():
                qi, kj = (row, col) if by_query else (col, row)
                rows, cols = slice(qi * tile, (qi + 1) * tile), slice(kj * tile, (kj + 1) * tile)
                allowed[rows, cols] = dense[rows, cols] if partial else True
    return allowed[:total, :total]


@pytest.mark.parametrize("lengths,tile", LAYOUTS)
def test_block_mask_tiles_cover_exactly_the_document_mask(lengths, tile):
    """Forward (query tiles -> key tiles) and backward (key tiles -> query tiles) lists both
    give exactly causal-within-document attention, and equal create_block_mask's lists."""
    from torch.nn.attention.flex_attention import create_block_mask

    total = sum(lengths)
    bm = document_block_mask(_cu(lengths), total, tile)
    want = _reference_mask(lengths)
    forward = _tiles_to_tokens(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks,
                               bm.full_kv_indices, bm.mask_mod, total, tile, by_query=True)
    backward = _tiles_to_tokens(bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks,
                                bm.full_q_indices, bm.mask_mod, total, tile, by_query=False)
    assert torch.equal(forward, want)
    assert torch.equal(backward, want)
    assert int(bm.full_kv_num_blocks.sum()) > 0 or max(lengths) < 2 * tile  # full tiles used
    # The same lists as PyTorch derives from evaluating the mask everywhere.
    ref = create_block_mask(bm.mask_mod, None, None, total, total, device="cpu", BLOCK_SIZE=tile)
    for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(bm, name), getattr(ref, name)), name
    assert torch.equal(bm.to_dense(), ref.to_dense())


def test_block_mask_is_built_once_per_row_tensor():
    """Layers share their row's cu_seqlens tensor: one BlockMask for all of them; another
    tensor, or the same one changed in place, gets its own."""
    cache = attention._LastBlockMask()
    row = _cu([10, 20])
    first = cache.get(row, 30)
    assert cache.get(row, 30) is first
    other = _cu([10, 20])
    assert cache.get(other, 30) is not first
    other[1] = 25
    pos = torch.arange(30)
    changed = cache.get(other, 30).mask_mod(0, 0, pos[:, None], pos[None, :])
    assert torch.equal(changed, _reference_mask([25, 5]))


def test_compiled_flex_compiles_once_for_every_document_layout():
    """A new row brings a new BlockMask and mask_mod closure: torch.compile must take them as
    inputs, not recompile (past its recompile limit it would fall back to eager attention,
    which materialises [heads, t, t] scores). aot_eager traces as the CUDA build does, on CPU."""
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, backend="aot_eager", dynamic=False)
    q, k, v = (x.detach() for x in _qkv(256, 4, 2, 16, seed=0))
    qb, kb, vb = (x.transpose(0, 1)[None] for x in (q, k, v))
    before = counters["stats"]["unique_graphs"]
    for lengths in ([256], [100, 156], [1, 85, 170], [3, 3, 250]):
        mask = document_block_mask(_cu(lengths), 256, 64)
        out = compiled(qb, kb, vb, block_mask=mask, scale=0.25, enable_gqa=True)
        want = attention_per_document(q, k, v, _cu(lengths), 0.25)
        assert (out[0].transpose(0, 1) - want).abs().max().item() <= 2e-5
    assert counters["stats"]["unique_graphs"] - before == 1


@pytest.fixture
def cpu_flex_backward(monkeypatch):
    """Lift FlexAttention's up-front refusal of CPU backward (tests only)."""
    import torch.nn.attention.flex_attention as flex

    monkeypatch.setattr(flex, "_validate_device", lambda *tensors: None)


def _qkv(total, heads, groups, dim, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(total, n, dim, generator=g).to(dtype).requires_grad_()
            for n in (heads, groups, groups)]


def _forward_backward(fn, q, k, v, grad_out):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad_out)
    return [out.detach(), q.grad, k.grad, v.grad]


@pytest.mark.parametrize("layout,heads,groups", [(0, 8, 2), (1, 8, 2), (3, 4, 4), (0, 4, 1)])
def test_flex_equals_per_document_attention_forward_and_backward(
        cpu_flex_backward, layout, heads, groups, monkeypatch):
    lengths, tile = LAYOUTS[layout]
    monkeypatch.setattr(attention, "FLEX_BLOCK_SIZE", tile)
    total, cu = sum(lengths), _cu(lengths)
    q, k, v = _qkv(total, heads, groups, 16, seed=heads + groups)
    grad_out = torch.randn(total, heads, 16, generator=torch.Generator().manual_seed(3))
    want = _forward_backward(lambda *x: attention_per_document(*x, cu, 0.25), q, k, v, grad_out)
    got = _forward_backward(lambda *x: flex_document_attention(*x, cu, 0.25), q, k, v, grad_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert (a - b).abs().max().item() <= 2e-5, name


def test_flex_bf16_stays_within_bf16_rounding(cpu_flex_backward):
    lengths, total = [60, 28, 40], 128
    q, k, v = _qkv(total, 8, 2, 16, seed=5, dtype=torch.bfloat16)
    ref = attention_per_document(q.float(), k.float(), v.float(), _cu(lengths), 0.25)
    out = flex_document_attention(q, k, v, _cu(lengths), 0.25)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()).item() <= 1e-2


def test_kernel_choice_on_cpu():
    assert resolve_kernel("auto", "cpu", torch.float32) == "sdpa"
    assert resolve_kernel("sdpa", "cpu", torch.bfloat16) == "sdpa"
    for name, needle in (("flash", "CUDA in bf16/fp16"), ("varlen", "CUDA in bf16/fp16"),
                         ("flex", "CUDA only")):
        with pytest.raises(ConfigError, match=f"model.local_attention_kernel={name}: .*{needle}"):
            resolve_kernel(name, "cpu", torch.bfloat16)
    # fp32 on CUDA never takes a half-precision-only kernel, whatever is installed.
    assert resolve_kernel("auto", "cuda", torch.float32) == "sdpa"


@pytest.mark.parametrize("missing,chosen", [((), "flex"), (("flex",), "flash"),
                                            (("flex", "flash"), "varlen"),
                                            (("flex", "flash", "varlen"), "sdpa")])
def test_auto_kernel_order_on_cuda(monkeypatch, missing, chosen):
    """auto on CUDA in bf16: FlexAttention (fastest measured on an H100), flash-attn, PyTorch's
    varlen; SDPA per document where none can run. cuDNN's packed-row kernel is never auto's
    choice, even where it can run, until the GPU kit has checked it (model/attention.py)."""
    monkeypatch.setattr(attention, "kernel_unavailable",
                        lambda name, device, dtype: "absent" if name in missing else None)
    attention.resolve_kernel.cache_clear()
    try:
        assert attention.resolve_kernel("auto", "cuda", torch.bfloat16) == chosen
    finally:
        attention.resolve_kernel.cache_clear()


def test_grouped_keys_go_to_sdpa_unexpanded_and_equal_expanded(monkeypatch):
    """The per-document kernel hands grouped K/V to SDPA (enable_gqa) and gets what expanding
    them gives."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(50, 8, 16, generator=g)
    k, v = torch.randn(50, 2, 16, generator=g), torch.randn(50, 2, 16, generator=g)
    cu = torch.tensor([0, 20, 21, 50], dtype=torch.int32)
    assert not attention._sdpa_takes_grouped_kv(q)  # CPU (and fp32 anywhere): expanded
    expanded = attention_per_document(q, k, v, cu, 0.25)
    monkeypatch.setattr(attention, "_sdpa_takes_grouped_kv", lambda q: True)
    grouped = attention_per_document(q, k, v, cu, 0.25)
    assert torch.allclose(grouped, expanded, atol=1e-6)


def test_explicit_sdpa_kernel_is_the_per_document_kernel():
    lengths = [37, 90, 1]
    q, k, v = _qkv(sum(lengths), 4, 2, 8, seed=1)
    got = varlen_causal_attention(q, k, v, _cu(lengths), None, 0.3, kernel="sdpa")
    assert torch.equal(got, attention_per_document(q, k, v, _cu(lengths), 0.3))


@pytest.mark.parametrize("overrides,needle", [
    (["model.local_attention_kernel=fast"], "choose auto, cudnn, flex, varlen, flash, sdpa"),
    (["model.local_attention_kernel=flex"], "set model.attention_backend=local"),
    (["model.local_attention_kernel=flex", "model.attention_backend=te"],
     "set model.attention_backend=local"),
])
def test_kernel_config_rules(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(load_config(None, overrides), 1)


def test_kernel_config_accepts_local_choices():
    for kernel in ("auto", "cudnn", "flex", "varlen", "flash", "sdpa"):
        validate(load_config(None, ["model.attention_backend=local",
                                    f"model.local_attention_kernel={kernel}"]), 1)


def test_model_build_refuses_a_kernel_that_cannot_run_here(megatron_single_process):
    from megatron_prolong.model.llama import build_llama

    cfg = load_config(None, ["model.preset=tiny", "model.attention_backend=local",
                             "model.local_attention_kernel=varlen"])
    with pytest.raises(ConfigError, match="local_attention_kernel=varlen"):
        build_llama(cfg.model, cfg.parallel, on_cpu=True, use_te=False)


def _ulysses_flex_errors() -> dict:
    """On every rank of a cp-sized gloo world: ulysses_attention running the flex kernel vs
    the per-document reference on the whole row (outputs and q/k/v gradients)."""
    import torch.distributed as dist
    import torch.nn.attention.flex_attention as flex

    from megatron_prolong.model.context_parallel import (cp_partition_indices, pad_documents,
                                                         ulysses_attention)

    flex._validate_device = lambda *tensors: None  # CPU backward, as in cpu_flex_backward
    attention.FLEX_BLOCK_SIZE = 16
    dist.init_process_group("gloo")
    cp, rank = dist.get_world_size(), dist.get_rank()
    errors = {}
    for heads, groups in ((8, 2), (4, 1)):
        row = dict(tokens=torch.zeros(1, 83), cu_seqlens=_cu([13, 51, 1, 18]))
        cu = pad_documents(row, 2 * cp)["cu_seqlens_padded"]
        q, k, v = _qkv(int(cu[-1]), heads, groups, 16, seed=heads)
        grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(9))
        want = _forward_backward(lambda *x: attention_per_document(*x, cu, 0.25),
                                 q, k, v, grad_out)
        mine = cp_partition_indices(cu, cp, rank)
        got = _forward_backward(
            lambda *x: ulysses_attention(*x, cu, dist.group.WORLD,
                                         lambda a, b, c: flex_document_attention(a, b, c, cu,
                                                                                 0.25)),
            q[mine], k[mine], v[mine], grad_out[mine])
        errors[(heads, groups)] = max((a - b[mine]).abs().max().item()
                                      for a, b in zip(got, want))
    return errors


@pytest.mark.slow
def test_flex_under_ulysses_context_parallelism():
    from distributed import run_distributed

    for per_rank in run_distributed(_ulysses_flex_errors, 2):
        assert max(per_rank.values()) <= 2e-5, per_rank
