"""Every document-masked attention kernel available here, checked and timed on the same packed
rows: forward and backward against the per-document reference, then forward + backward time.

    python tools/bench_attention.py                        # 64K rows, Llama-3-8B heads, bf16, CUDA
    python tools/bench_attention.py --json results/kernels.json
    python tools/bench_attention.py --tiny                 # CPU smoke run (CI runs it)

Kernels: the local path's cudnn (cuDNN's fused attention over the packed row in one call),
flash (flash-attn varlen), varlen (PyTorch's varlen attention), flex
(FlexAttention + document BlockMask, compiled), sdpa (SDPA per document), each through
model/attention.py's varlen_causal_attention as training calls it; and te (Transformer Engine's
DotProductAttention, THD, padding_causal) where TE is importable. One that cannot run here is
listed with the reason.

Check: fresh random q, k, v (Llama-3 GQA: 32 query heads over 8 KV groups, head dim 128) on two
packed rows of `--seq-length` tokens (a row of the benchmark recipe's synthetic data, 1-4
documents; and many short documents), the kernel in `--dtype`, the reference = SDPA per
document in fp32 from the same (rounded) inputs on the same device. Reported: relative error
||x - ref|| / ||ref|| of the output and of dq, dk, dv; a kernel passes at <= --tolerance
(bf16: 1e-2 output, twice that for gradients; NaN never passes). For flex also the number of
graphs compiled over three different document layouts (1: the BlockMask is an input, the
kernel is compiled once per row length).
Time: median of CUDA-event timings (after warm-up) of forward and of forward + backward; TFLOP/s
counts only the attention documents leave (forward 2 x heads x dim x sum of L^2, backward 2.5x
the forward, FlashAttention's convention).
Exit status: 0 when every available kernel passes, 1 otherwise, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from bench_common import write_json  # noqa: E402

KERNELS = ("cudnn", "flash", "varlen", "flex", "sdpa", "te")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TINY = ["--device", "cpu", "--seq-length", "384", "--heads", "4", "--groups", "2",
        "--head-dim", "16", "--dtype", "fp32", "--iters", "2"]


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-length", type=int, default=65536)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when visible")
    p.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    p.add_argument("--tolerance", type=float, default=None,
                   help="relative error bound of the output (gradients: twice it); default "
                        "1e-2 in bf16/fp16, 1e-5 in fp32")
    p.add_argument("--iters", type=int, default=10, help="timed repetitions")
    p.add_argument("--one-document", action="store_true",
                   help="check and time one row holding one document of --seq-length tokens "
                        "(the 512K check: --seq-length 524288) instead of the two 64K rows")
    p.add_argument("--ref-groups", type=int, default=None,
                   help="compare only the first N K/V groups (and their query heads) with the "
                        "fp32 reference, which then costs N/groups of the full one (512K)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--tiny", action="store_true", help="CPU smoke configuration (seconds)")
    argv = sys.argv[1:] if argv is None else argv
    ns = p.parse_args((TINY if "--tiny" in argv else []) + argv)
    ns.device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if ns.tolerance is None:
        ns.tolerance = 1e-5 if ns.dtype == "fp32" else 1e-2
    return ns


def packed_rows(seq_length: int, seed: int, one_document: bool = False) -> dict[str, list[int]]:
    """Document lengths of the two rows every kernel sees (or the one-document row)."""
    if one_document:
        return {"one-document": [seq_length]}
    from megatron_prolong.training.data_source import SyntheticPackedDataset

    recipe_row = SyntheticPackedDataset(seq_length, 2, seed).segment_lengths(0).tolist()
    short, total, i = [], 0, 0
    while total < seq_length:  # 97 .. 3,000 tokens, cycling; the last one fills the row
        n = min(97 + (i * 631) % 2904, seq_length - total)
        short.append(n)
        total, i = total + n, i + 1
    return {"recipe-row": recipe_row, "short-docs": short}


def _cu(lengths: list[int], device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                        device=device)


def _te_kernel(heads: int, groups: int, dim: int, scale: float):
    import transformer_engine.pytorch as te

    module = te.DotProductAttention(heads, dim, num_gqa_groups=groups, attention_dropout=0.0,
                                    qkv_format="thd", attn_mask_type="padding_causal",
                                    softmax_scale=scale)

    def run(q, k, v, cu, max_seqlen):
        out = module(q, k, v, cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_seqlen,
                     max_seqlen_kv=max_seqlen)
        return out.view(q.shape)

    return run


def kernel_function(name: str, ns) -> tuple[Optional[Callable], Optional[str]]:
    """(fn(q, k, v, cu, max_seqlen) -> out, None) or (None, why it cannot run here)."""
    from megatron_prolong.model.attention import kernel_unavailable, varlen_causal_attention

    scale = ns.head_dim ** -0.5
    dtype = DTYPES[ns.dtype]
    if name == "te":
        if ns.device != "cuda":
            return None, "Transformer Engine runs on CUDA only"
        try:
            return _te_kernel(ns.heads, ns.groups, ns.head_dim, scale), None
        except Exception as exc:  # not installed, or its CUDA libraries do not load
            return None, f"Transformer Engine is not usable here ({type(exc).__name__}: {exc})"
    reason = kernel_unavailable(name, ns.device, dtype)
    if reason:
        return None, reason
    return (lambda q, k, v, cu, m: varlen_causal_attention(q, k, v, cu, m, scale, kernel=name),
            None)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _inputs(ns, total: int, seed: int):
    g = torch.Generator(device=ns.device).manual_seed(seed)
    dtype = DTYPES[ns.dtype]

    def rand(n):
        return torch.randn(total, n, ns.head_dim, generator=g, device=ns.device).to(dtype)

    return rand(ns.heads), rand(ns.groups), rand(ns.groups), rand(ns.heads)


def _forward_backward(fn, q, k, v, grad_out):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad_out)
    return [out.detach(), q.grad, k.grad, v.grad]


def check(fn, ns, lengths: list[int], seed: int) -> dict:
    """Relative errors of the kernel against fp32 SDPA per document on the same inputs."""
    from megatron_prolong.model.attention import attention_per_document

    cu = _cu(lengths, ns.device)
    q, k, v, grad_out = _inputs(ns, sum(lengths), seed)
    got = _forward_backward(lambda *x: fn(*x, cu, max(lengths)), q, k, v, grad_out)
    groups = ns.ref_groups or ns.groups
    heads = groups * (ns.heads // ns.groups)  # megatron orders query heads group by group
    if groups < ns.groups:
        got = [x[:, :n] for x, n in zip(got, (heads, heads, groups, groups))]
        q, grad_out, k, v = q[:, :heads], grad_out[:, :heads], k[:, :groups], v[:, :groups]
    ref = _forward_backward(
        lambda *x: attention_per_document(*x, cu, ns.head_dim ** -0.5),
        q.float(), k.float(), v.float(), grad_out.float())
    errors = {name: _rel(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref)}
    bounds = {"out": ns.tolerance, "dq": 2 * ns.tolerance, "dk": 2 * ns.tolerance,
              "dv": 2 * ns.tolerance}
    passed = all(errors[n] <= bounds[n] for n in errors)  # NaN compares False: never passes
    return dict(rel_error=errors, passed=passed)


def _timed(fn, ns) -> float:
    """Median milliseconds of fn() over ns.iters runs after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(ns.iters):
        if ns.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def timing(fn, ns, lengths: list[int], seed: int) -> dict:
    cu = _cu(lengths, ns.device)
    q, k, v, grad_out = _inputs(ns, sum(lengths), seed)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    forward_ms = _timed(lambda: fn(q, k, v, cu, max(lengths)), ns)
    both_ms = _timed(lambda: fn(q, k, v, cu, max(lengths)).backward(grad_out), ns)
    fwd_flops = 2.0 * ns.heads * ns.head_dim * sum(n * n for n in lengths)
    return dict(forward_ms=forward_ms, forward_backward_ms=both_ms,
                forward_tflops=fwd_flops / forward_ms / 1e9,
                forward_backward_tflops=3.5 * fwd_flops / both_ms / 1e9)


def graphs_over_layouts(fn, ns) -> Optional[int]:
    """How many graphs torch.compile builds for three document layouts of one row length."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return None
    before = counters["stats"]["unique_graphs"]
    total = ns.seq_length
    for lengths in ([total], [total // 2, total - total // 2], [1, total // 3, total - 1 - total // 3]):
        q, k, v, _ = _inputs(ns, total, 7)
        fn(q, k, v, _cu(lengths, ns.device), max(lengths))
    return counters["stats"]["unique_graphs"] - before


def run(ns) -> dict:
    rows = packed_rows(ns.seq_length, ns.seed, ns.one_document)
    results = []
    for name in ns.kernels:
        fn, reason = kernel_function(name, ns)
        entry = dict(kernel=name, available=fn is not None, reason=reason)
        if fn is not None:
            try:
                entry["graphs_for_3_layouts"] = (graphs_over_layouts(fn, ns) if name == "flex"
                                                 and ns.device == "cuda" else None)
                for i, (row, lengths) in enumerate(rows.items()):
                    entry[row] = {**check(fn, ns, lengths, ns.seed + i),
                                  **timing(fn, ns, lengths, ns.seed + i)}
                entry["passed"] = all(entry[row]["passed"] for row in rows)
            except Exception as exc:  # a kernel that breaks is a result, not the end of the run
                entry.update(passed=False, error=f"{type(exc).__name__}: {exc}")
            if ns.device == "cuda":
                torch.cuda.empty_cache()
        results.append(entry)
        print(describe(entry, rows), flush=True)
    return dict(device=torch.cuda.get_device_name() if ns.device == "cuda" else "cpu",
                dtype=ns.dtype, seq_length=ns.seq_length, heads=ns.heads, groups=ns.groups,
                reference_groups=ns.ref_groups or ns.groups,
                head_dim=ns.head_dim, tolerance=ns.tolerance, torch=torch.__version__,
                rows={k: len(v) for k, v in rows.items()}, kernels=results)


def describe(entry: dict, rows: dict) -> str:
    if not entry["available"]:
        return f"{entry['kernel']:>6}: not available ({entry['reason']})"
    if "error" in entry:
        return f"{entry['kernel']:>6}: FAILED {entry['error']}"
    parts = []
    for row in rows:
        r = entry[row]
        worst = max(r["rel_error"].values())
        parts.append(f"{row}: max rel err {worst:.2e} {'ok' if r['passed'] else 'FAIL'}, "
                     f"fwd {r['forward_ms']:.2f} ms, fwd+bwd {r['forward_backward_ms']:.2f} ms "
                     f"({r['forward_backward_tflops']:.0f} TFLOP/s)")
    graphs = entry.get("graphs_for_3_layouts")
    extra = f" | graphs compiled for 3 layouts: {graphs}" if graphs is not None else ""
    return f"{entry['kernel']:>6}: " + " | ".join(parts) + extra


def main(argv: Optional[list[str]] = None) -> int:
    ns = parse_args(argv)
    if ns.heads % ns.groups:
        print(f"error: --heads {ns.heads} is not a multiple of --groups {ns.groups}",
              file=sys.stderr)
        return 2
    if ns.ref_groups is not None and not 1 <= ns.ref_groups <= ns.groups:
        print(f"error: --ref-groups {ns.ref_groups} must be in 1..--groups ({ns.groups})",
              file=sys.stderr)
        return 2
    result = run(ns)
    write_json(ns.json, result)
    available = [k for k in result["kernels"] if k["available"]]
    return 0 if available and all(k["passed"] for k in available) else 1


if __name__ == "__main__":
    sys.exit(main())
