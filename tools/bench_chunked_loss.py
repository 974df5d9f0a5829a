"""Peak memory of the output layer + cross-entropy, with and without chunking.

    python tools/bench_chunked_loss.py                       # 16K tokens x 128,256 vocab x 4096
    python tools/bench_chunked_loss.py --tokens 4096 --dtype fp32 --chunks 1024 8192

Each variant runs forward + backward once in its own subprocess (so peaks do not mix) and
reports the peak resident memory above what the inputs and their gradient buffers already
occupy: on a GPU the same quantity is the loss's share of torch.cuda.max_memory_allocated.
`full` is megatron-core's path (bf16/fp32 logits [tokens, vocab], upcast to fp32 inside
vocab_parallel_cross_entropy); `chunk N` is model/loss.py's chunked_cross_entropy.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def _rss_gib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def _reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then the peak is the lifetime peak; inputs are allocated without spikes


def _peak_gib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_variant(tokens: int, vocab: int, hidden: int, dtype: str, chunk: int) -> dict:
    """One forward + backward; returns the peak RSS above the inputs (GiB) and the time."""
    import torch

    torch.manual_seed(0)
    dt = getattr(torch, DTYPES[dtype])
    h = torch.randn(tokens, 1, hidden, dtype=dt).mul_(0.1).requires_grad_(True)
    w = torch.randn(vocab, hidden, dtype=dt).mul_(0.02).requires_grad_(True)
    labels = torch.randint(0, vocab, (1, tokens))
    # Gradient buffers exist in training anyway (DDP main_grad): allocate them up front.
    h.grad, w.grad = torch.zeros_like(h), torch.zeros_like(w)
    # Import (and initialise) everything first: only the loss itself may move the peak.
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_prolong.model.loss import chunked_cross_entropy

    if chunk == 0:
        os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1")
        from megatron_prolong.config import Layout
        from megatron_prolong.training.parallel import init_distributed, init_model_parallel

        init_distributed("cpu")
        init_model_parallel(Layout(1, 1, 1, 1, 1, 1), seed=0)
    before = _rss_gib()
    _reset_peak()
    start = time.perf_counter()
    if chunk == 0:
        logits = torch.matmul(h, w.t())  # [s, 1, V] like the output layer
        loss = vocab_parallel_cross_entropy(logits, labels.t())
        del logits
    else:
        loss = chunked_cross_entropy(h, w, labels, chunk)
    loss.sum().backward()
    seconds = time.perf_counter() - start
    return {"chunk": chunk, "peak_above_inputs_gib": round(_peak_gib() - before, 2),
            "seconds": round(seconds, 1), "loss": round(float(loss.mean()), 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 8192, 2048],
                    help="0 = unchunked (full logits)")
    ap.add_argument("--variant", type=int, help=argparse.SUPPRESS)  # child process mode
    args = ap.parse_args()
    if args.variant is not None:
        print(json.dumps(run_variant(args.tokens, args.vocab, args.hidden, args.dtype,
                                     args.variant)))
        return 0
    logits_gib = args.tokens * args.vocab * 4 / 2**30
    print(f"loss memory for {args.tokens:,} tokens x {args.vocab:,} vocab x hidden "
          f"{args.hidden} ({args.dtype} inputs; fp32 logits alone would be {logits_gib:.1f} GiB)")
    for chunk in args.chunks:
        cmd = [sys.executable, __file__, "--tokens", str(args.tokens), "--vocab",
               str(args.vocab), "--hidden", str(args.hidden), "--dtype", args.dtype,
               "--variant", str(chunk)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        name = "full logits (megatron)" if chunk == 0 else f"chunked, {chunk} tokens"
        if out.returncode != 0:
            print(f"  {name:<24} failed (exit {out.returncode}): {out.stderr.strip()[-300:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {name:<24} peak {r['peak_above_inputs_gib']:6.2f} GiB above inputs, "
              f"{r['seconds']:6.1f} s fwd+bwd, mean loss {r['loss']}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
