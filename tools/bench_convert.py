#!/usr/bin/env python
"""Peak resident memory of tools/convert.py relative to the checkpoint's size.

Writes a random-weight HF Llama checkpoint of at least 1B parameters built from a config
(default: Llama-3-8B's widths and vocabulary with 2 layers, 1.5B parameters, bf16), then runs
each direction in a fresh process and reports that process's peak RSS: in total, and above the
RSS of a process that only imports the converter (torch + megatron-core).

  python tools/bench_convert.py [--layers 2] [--dtype bf16] [--workdir /tmp/bench_convert]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WIDE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
            vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5)


def write_random_hf(directory: str, layers: int, dtype_name: str) -> int:
    """A random HF checkpoint, streamed to disk tensor by tensor; returns its size in bytes."""
    import torch

    from megatron_prolong.convert import llama_mapping as lm
    from megatron_prolong.convert.hf_config import DTYPE_NAMES, hf_config_from_model, model_config_from_hf
    from megatron_prolong.convert.hf_io import PlannedTensor, plan_shards, write_sharded

    dtype = DTYPE_NAMES[dtype_name]
    hf = dict(WIDE, num_hidden_layers=layers, architectures=["LlamaForCausalLM"], model_type="llama",
              tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)
    model = model_config_from_hf(hf)
    units = lm.units(model)
    groups = [[PlannedTensor(n, dtype, s) for n, s in zip(u.hf_names(), lm.hf_shapes(u.rule, model))]
              for u in units]
    shards = plan_shards(groups, 2 * 10**9)

    def tensors():
        g = torch.Generator().manual_seed(0)
        for group in groups:
            for t in group:
                yield t.name, (torch.randn(t.shape, generator=g) * 0.02).to(dtype)

    os.makedirs(directory, exist_ok=True)
    write_sharded(directory, shards, tensors())
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config_from_model(model, dtype, hf), f)
    return sum(t.nbytes for g in groups for t in g), max(t.nbytes for g in groups for t in g)


def _rss() -> dict[str, int]:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmHWM", "RssAnon", "RssFile")}


def _sample_peaks(peaks: dict[str, int], stop: threading.Event) -> None:
    """Peak anonymous memory (what the process allocates) and peak file-backed pages (mapped
    files, reclaimable page cache), sampled every 20 ms."""
    while not stop.wait(0.02):
        for k, v in _rss().items():
            peaks[k] = max(peaks.get(k, 0), v)


def child(argv: list[str]) -> None:
    """Run one conversion (or only the imports) and print this process's peak memory in bytes."""
    peaks: dict[str, int] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_peaks, args=(peaks, stop), daemon=True)
    sampler.start()
    if argv[0] != "imports":
        sys.path.insert(0, os.path.join(ROOT, "tools"))
        import convert

        rc = convert.main(argv)
        if rc:
            sys.exit(rc)
    else:
        import megatron_prolong.convert.hf_to_mcore  # noqa: F401
        import megatron_prolong.convert.mcore_io  # noqa: F401
        import megatron_prolong.model.llama  # noqa: F401
    stop.set()
    sampler.join()
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
    print(json.dumps({"peak_rss": _rss()["VmHWM"], "peak_anon": peaks["RssAnon"],
                      "peak_file": peaks["RssFile"]}))


def measure(argv: list[str]) -> tuple[dict, float]:
    start = time.time()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *argv],
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{argv[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), time.time() - start


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default 2: 1.5B parameters)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--workdir", default="/tmp/bench_convert")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args()
    dtype_name = {"bf16": "bfloat16", "fp32": "float32"}[args.dtype]
    hf_dir, mc_dir, back_dir = (os.path.join(args.workdir, d) for d in ("hf", "mcore", "hf_back"))
    shutil.rmtree(args.workdir, ignore_errors=True)
    size, largest = write_random_hf(hf_dir, args.layers, dtype_name)
    gib = 2**30
    print(f"checkpoint: {size / gib:.2f} GiB ({size // (2 if args.dtype == 'bf16' else 4) / 1e9:.2f}B "
          f"parameters, {args.dtype}, {args.layers} layers of Llama-3-8B width); largest tensor "
          f"{largest / gib:.2f} GiB")
    base, _ = measure(["imports"])
    print(f"imports only: peak RSS {base['peak_rss'] / gib:.2f} GiB (anonymous {base['peak_anon'] / gib:.2f})")
    runs = [("hf-to-mcore", ["hf-to-mcore", "--hf-dir", hf_dir, "--out", mc_dir]),
            ("mcore-to-hf", ["mcore-to-hf", "--checkpoint", mc_dir, "--out", back_dir])]
    for name, argv in runs:
        peak, seconds = measure(argv)
        anon = peak["peak_anon"] - base["peak_anon"]
        print(f"{name} ({seconds:.0f} s): peak RSS {peak['peak_rss'] / gib:.2f} GiB = "
              f"{peak['peak_rss'] / size:.2f} x checkpoint; of it anonymous memory above the imports "
              f"{anon / gib:.2f} GiB = {anon / size:.2f} x checkpoint, mapped file pages up to "
              f"{peak['peak_file'] / gib:.2f} GiB; anonymous = {anon / largest:.1f} x the largest tensor")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
