"""Variants of the document-masked attention kernels, checked and timed on the benchmark's rows:
what the project's kernel choice and FlexAttention settings rest on (docs/performance.md).

    python tools/gpu_kit/explore_attention.py --json variants.json      # CUDA, ~2-3 minutes

Each variant runs through tools/bench_attention.py's check (fp32 SDPA per document as the
reference, fresh random inputs) and timing (median of CUDA events), on the recipe's row (1-4
long documents) and on a row of short documents:
  varlen                  PyTorch's varlen attention (FlashAttention-2 kernels)
  flex                    the project's kernel: FlexAttention + document BlockMask, compiled
  flex-tma                the same with kernel_options USE_TMA (Hopper's tensor memory accelerator)
  flex-autotune           compiled with mode="max-autotune-no-cudagraphs" (Inductor tries tiles)
  sdpa-cudnn / sdpa-flash SDPA per document forced onto cuDNN / FlashAttention, K/V expanded
  sdpa-cudnn-gqa          cuDNN per document with enable_gqa (no K/V expansion)
A variant that fails is reported with its error; the others still run.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import torch  # noqa: E402

import bench_attention as bench  # noqa: E402
from bench_common import write_json  # noqa: E402


def _flex(scale: float, mode: Optional[str] = None, kernel_options: Optional[dict] = None):
    from megatron_prolong.model.attention import _flex_module, _last_block_mask

    compiled = torch.compile(_flex_module().flex_attention, dynamic=False, mode=mode)

    def fn(q, k, v, cu, max_seqlen):
        block_mask = _last_block_mask.get(cu, q.shape[0])
        qb, kb, vb = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        out = compiled(qb, kb, vb, block_mask=block_mask, scale=scale, enable_gqa=True,
                       kernel_options=kernel_options)
        return out.squeeze(0).transpose(0, 1)

    return fn


def _sdpa(scale: float, backend, gqa: bool):
    """The project's SDPA per document, forced onto `backend`; K/V expanded unless `gqa`
    (grouped K/V reach SDPA only where attention_per_document passes them: CUDA, bf16/fp16)."""
    from torch.nn.attention import sdpa_kernel

    from megatron_prolong.model.attention import _expand_groups, attention_per_document

    def fn(q, k, v, cu, max_seqlen):
        if not gqa:
            k, v = _expand_groups(k, q.shape[1]), _expand_groups(v, q.shape[1])
        with sdpa_kernel([backend]):
            return attention_per_document(q, k, v, cu, scale)

    return fn


def _cudnn_whole_row(scale: float):
    from megatron_prolong.model.cudnn_attention import cudnn_document_attention

    return lambda q, k, v, cu, max_seqlen: cudnn_document_attention(q, k, v, cu, scale)


def variants(ns) -> dict:
    from torch.nn.attention import SDPBackend

    scale = ns.head_dim ** -0.5
    return {
        "cudnn": lambda: bench.kernel_function("cudnn", ns)[0],
        # S = the whole row instead of the longest document's bucket: fewer graphs, more
        # (empty) work launched; which costs more is what this measures.
        "cudnn-s-row": lambda: _cudnn_whole_row(scale),
        "varlen": lambda: bench.kernel_function("varlen", ns)[0],
        "flex": lambda: _flex(scale),
        "flex-tma": lambda: _flex(scale, kernel_options={"USE_TMA": True}),
        "sdpa-cudnn": lambda: _sdpa(scale, SDPBackend.CUDNN_ATTENTION, gqa=False),
        "sdpa-flash": lambda: _sdpa(scale, SDPBackend.FLASH_ATTENTION, gqa=False),
        "sdpa-cudnn-gqa": lambda: _sdpa(scale, SDPBackend.CUDNN_ATTENTION, gqa=True),
        "flex-autotune": lambda: _flex(scale, mode="max-autotune-no-cudagraphs"),
    }


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json")
    p.add_argument("--only", nargs="+", help="variants to run (default: all)")
    p.add_argument("--seq-length", type=int, default=65536)
    args = p.parse_args(argv)
    ns = bench.parse_args(["--seq-length", str(args.seq_length), "--iters", "5"])
    if ns.device != "cuda":
        print("error: needs CUDA", file=sys.stderr)
        return 2
    torch._dynamo.config.recompile_limit = 64
    rows = bench.packed_rows(ns.seq_length, ns.seed)
    results = []
    for name, make in variants(ns).items():
        if args.only and name not in args.only:
            continue
        torch._dynamo.reset()
        entry = dict(kernel=name, available=True, reason=None)
        try:
            fn = make()
            for i, (row, lengths) in enumerate(rows.items()):
                entry[row] = {**bench.check(fn, ns, lengths, ns.seed + i),
                              **bench.timing(fn, ns, lengths, ns.seed + i)}
            entry["passed"] = all(entry[row]["passed"] for row in rows)
        except Exception as exc:  # a variant that breaks is a result
            entry.update(passed=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        torch.cuda.empty_cache()
        results.append(entry)
        print(bench.describe(entry, rows), flush=True)
    write_json(args.json, dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                               seq_length=ns.seq_length, rows={k: len(v) for k, v in rows.items()},
                               variants=results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
