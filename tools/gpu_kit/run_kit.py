"""The GPU kit's stages, results and report (started by tools/gpu_kit/run.sh on the GPU machine).

    bash tools/gpu_kit/run.sh OUT_DIR                          # every stage, within --budget-s
    bash tools/gpu_kit/run.sh OUT_DIR --quick                  # the 9-minute measurement
    bash tools/gpu_kit/run.sh OUT_DIR bench:local-flex peer    # only the stages named
    python tools/gpu_kit/run_kit.py --merge OUT_DIR A/results.json B/results.json
    python tools/gpu_kit/run_kit.py OUT_DIR --tiny             # every stage on CPU, tiny (CI)

Stages, in this order; a stage that fails is recorded and the next one runs:
  env      versions, the GPU, which attention kernels and backends can run here (always first)
  tests    pytest -m gpu
  kernels  tools/bench_attention.py: every kernel against the per-document reference, timed
           (kernels:512k: the cudnn kernel on one 524,288-token document, when named)
  bench    tools/bench_train.py on examples/bench_64k_1gpu.yaml, once per backend available:
           bench:local-cudnn, bench:local-flex, bench:local-varlen, bench:te,
           bench:local-flash (and bench:local-sdpa when named); BACKEND+plan runs it with
           model.recompute=auto (the planner's choice for this GPU) instead of the recipe's
           full recomputation, BACKEND+fused with model.fused_loss=true; bench:best1 and
           bench:best2 = the first and second available backend, +plan+fused
  peer     tools/bench_hf_peer.py, the HF transformers peer (peer:flash|flex|sdpa to choose);
           out of GPU memory with fp32 master weights, it runs again as peer-bf16 (bf16 weights)
--quick = bench:best1 peer kernels bench:best2 tests, 5 steps per benchmark (about 7.5 minutes
on an H100 from the 2026-11-22 timings), within a 540 s budget.
Each stage is its own process under a time limit. A stage that would not fit in what is left
of --budget-s is deferred: the log ends with the command that runs the rest, and --merge makes
one report of several runs. OUT_DIR receives results.json (everything), results.md (tables),
kit.log (all output) and, with --profile, profiles.txt (torch.profiler's top costs).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TOOLS = os.path.join(REPO, "tools")
RECIPE = os.path.join("examples", "bench_64k_1gpu.yaml")
STAGES = ("env", "tests", "kernels", "bench", "peer")
# stage -> (time limit in seconds, least time left that is worth starting it)
LIMITS = {"env": (180, 0), "tests": (300, 60), "kernels": (300, 60), "bench": (420, 150),
          "peer": (420, 150), "peer-bf16": (420, 150)}
BACKEND_ORDER = ("local-cudnn", "local-flex", "local-varlen", "te", "local-flash")
BACKEND_OVERRIDES = {
    "te": ["model.attention_backend=te"],
    **{f"local-{k}": ["model.attention_backend=local", f"model.local_attention_kernel={k}"]
       for k in ("cudnn", "flex", "varlen", "flash", "sdpa")},
}
# bench:BACKEND[+plan][+fused]: +plan lets the planner choose the recomputation
# (model.recompute=auto), +fused runs the chunked loss's element-wise work compiled
# (model.fused_loss=true)
VARIANTS = {"+plan": ["model.recompute=auto"], "+fused": ["model.fused_loss=true"]}
BEST = "+plan+fused"
# Our best row and the peer first (the headline ratio), the kernel check before the second
# bench, pytest last: what a short budget defers is what matters least.
QUICK = ["bench:best1", "peer", "kernels", "bench:best2", "tests"]
QUICK_STEPS, QUICK_BUDGET_S = 5, 540
# The 512K check of the cudnn kernel: one document, every head run, the first K/V group's
# heads compared with the fp32 reference (a full fp32 reference at 512K takes minutes).
LONG_KERNEL_ARGS = ["--kernels", "cudnn", "--one-document", "--seq-length", "524288",
                    "--ref-groups", "1", "--iters", "2"]
TINY_LONG_KERNEL_ARGS = ["--kernels", "cudnn", "sdpa", "--one-document", "--seq-length", "512",
                         "--ref-groups", "1"]
RESERVE_S = 20  # kept for writing the report after the last stage
_now = time.monotonic  # the budget's clock


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="results folder (created; files there are replaced)")
    p.add_argument("stages", nargs="*", help=f"stages to run (default: {' '.join(STAGES)})")
    p.add_argument("--budget-s", type=float, default=560,
                   help="wall-clock budget of this run; stages that do not fit are deferred")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per benchmark")
    p.add_argument("--warmup", type=int, default=2, help="of which left out of the timing")
    p.add_argument("--profile", action="store_true",
                   help="benchmarks also profile their last step (profiles.txt)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke sizes for every stage")
    p.add_argument("--quick", action="store_true",
                   help=f"{' '.join(QUICK)} with --steps {QUICK_STEPS} within --budget-s "
                        f"{QUICK_BUDGET_S} (stages named as well are added)")
    p.add_argument("--merge", nargs="+", metavar="RESULTS.json",
                   help="only merge these results files into OUT's results.json/results.md")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    ns = p.parse_intermixed_args(argv)
    if ns.quick:
        ns.stages = QUICK + [s for s in ns.stages if s not in QUICK]
        given = argv if argv is not None else sys.argv[1:]
        if not any(a.startswith("--steps") for a in given):
            ns.steps = QUICK_STEPS
        if not any(a.startswith("--budget-s") for a in given):
            ns.budget_s = QUICK_BUDGET_S
    return ns


# ---------------------------------------------------------------------------------------------
# The machine: what can run here (a subprocess, so this process never holds a CUDA context)
# ---------------------------------------------------------------------------------------------
def probe(tiny: bool) -> dict:
    import importlib.metadata as md
    import platform

    info: dict = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("torch", "triton", "transformers", "megatron-core", "nvidia-cudnn-frontend",
                 "flash-attn",
                 "transformer-engine", "transformer-engine-torch", "numpy", "zstandard"):
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            info[name] = None
    import torch

    cuda = torch.cuda.is_available() and not tiny
    info.update(torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
                else None)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_count=torch.cuda.device_count())
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    from megatron_prolong.model.attention import kernel_unavailable
    from megatron_prolong.model.llama import transformer_engine_available

    kernels = {k: kernel_unavailable(k, device, dtype)
               for k in ("cudnn", "flash", "varlen", "flex")}
    info["local_kernels"] = {k: reason or "available" for k, reason in kernels.items()}
    te = cuda and transformer_engine_available()
    info["transformer_engine"] = te
    backends = [b for b in BACKEND_ORDER
                if (b == "te" and te) or (b.startswith("local-") and not kernels[b[6:]])]
    info["bench_backends"] = backends or ["local-sdpa"]
    sys.path.insert(0, TOOLS)
    from bench_hf_peer import PeerError, choose_attention

    row = 256 if tiny else 65536
    try:
        info["peer_attention"] = choose_attention("auto", device, row)
    except PeerError as exc:
        info["peer_attention"] = None
        info["peer_unavailable"] = str(exc)
    return info


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------
def expand(stages: list[str], env: dict) -> list[str]:
    out = []
    backends = env.get("bench_backends") or list(BACKEND_ORDER[:2])
    for stage in stages:
        if stage == "bench":
            out += [f"bench:{b}" for b in backends]
        elif stage in ("bench:best1", "bench:best2"):  # the first / second backend here
            index = int(stage[-1]) - 1
            out += [f"bench:{b}{BEST}" for b in backends[index:index + 1]]
        else:
            out.append(stage)
    return out


def stage_command(stage: str, ns, parts: str) -> list[str]:
    py = sys.executable
    tiny = ["--tiny"] if ns.tiny else []
    profile = ["--profile"] if ns.profile else []
    steps = [f"training.train_steps={ns.steps}", "--warmup", str(ns.warmup)]
    if stage == "env":
        return [py, os.path.abspath(__file__), parts, "--probe"] + tiny
    if stage == "tests":
        # one hung test (a collective, a compile) must not take the whole stage's time
        per_test = (["--timeout=150"]
                    if importlib.util.find_spec("pytest_timeout") else [])
        return [py, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                *per_test, f"--basetemp={os.path.join(parts, 'pytest')}", "tests"]
    if stage in ("kernels", "kernels:512k"):
        long = [] if stage == "kernels" else TINY_LONG_KERNEL_ARGS if ns.tiny else LONG_KERNEL_ARGS
        return [py, os.path.join(TOOLS, "bench_attention.py"), "--json",
                os.path.join(parts, _results_file(stage))] + tiny + long
    kind, _, variant = stage.partition(":")
    if kind == "bench":
        backend, *suffixes = variant.split("+")
        if backend not in BACKEND_OVERRIDES or any(f"+{x}" not in VARIANTS for x in suffixes):
            raise ValueError(f"stage {stage!r}: choose bench:{'|'.join(BACKEND_OVERRIDES)}, "
                             f"each optionally with {' and '.join(VARIANTS)}")
        extra = [o for x in suffixes for o in VARIANTS[f"+{x}"]]
        return ([py, os.path.join(TOOLS, "bench_train.py"), RECIPE, *BACKEND_OVERRIDES[backend],
                 *extra, *steps, "--name", variant, "--json",
                 os.path.join(parts, f"{stage}.json")] + tiny + profile)
    if kind in ("peer", "peer-bf16"):
        weights = ["--param-dtype", "bf16", "--name", f"hf-peer-{variant or 'auto'}-bf16-weights"
                   ] if kind == "peer-bf16" else []
        return ([py, os.path.join(TOOLS, "bench_hf_peer.py"), RECIPE, *steps, "--attention",
                 variant or "auto", *weights, "--json", os.path.join(parts, f"{stage}.json")]
                + tiny + profile)
    raise ValueError(f"unknown stage {stage!r}: choose {', '.join(STAGES)}, bench:BACKEND or "
                     "peer:ATTENTION")


def _results_file(stage: str) -> str:
    return {"kernels": "kernels.json", "kernels:512k": "kernels-512k.json"}.get(stage,
                                                                               f"{stage}.json")


def run_process(cmd: list[str], limit: float, log) -> tuple[Optional[int], str]:
    """Run cmd, streaming its output to stdout and the log; (exit code, last 4 KB of output).
    Exit code None: killed at the time limit."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, env=env, start_new_session=True)
    tail: list[str] = []

    def pump():
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            tail.append(line)
            del tail[:-60]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(limit, 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the stage's own process group
        proc.wait()
        rc = None
    reader.join(timeout=10)
    log.flush()
    return rc, "".join(tail)[-4000:]


def pytest_summary(text: str) -> dict:
    # pytest's last summary line, not simply the last line: process teardown may print after it
    summary = next((line for line in reversed(text.splitlines())
                    if re.search(r"\d+ (passed|failed|errors?)\b", line)), "")
    counts = {}
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|"
                                   r"xpassed)", summary):
        counts[word.rstrip("s") if word.startswith("error") else word] = int(number)
    return counts


def collect(stage: str, rc: Optional[int], tail: str, parts: str, results: dict,
            profiles: list[str]) -> str:
    """Fold a finished stage's output into results; returns a one-line note."""
    if stage == "env":
        for line in reversed(tail.splitlines()):
            if line.startswith("{"):
                results["env"] = json.loads(line)
                env = results["env"]
                return (f"{env.get('gpu', 'no GPU')}; torch {env.get('torch')}; backends "
                        f"{', '.join(env.get('bench_backends', []))}; peer "
                        f"{env.get('peer_attention')}")
        return "no probe output"
    if stage == "tests":
        results["tests"] = pytest_summary(tail)
        return ", ".join(f"{n} {w}" for w, n in results["tests"].items()) or "no summary line"
    path = os.path.join(parts, _results_file(stage))
    if not os.path.exists(path):
        return "no results file"
    with open(path) as f:
        data = json.load(f)
    if stage in ("kernels", "kernels:512k"):
        results[stage.replace(":", "_")] = data
        ok = [k["kernel"] for k in data["kernels"] if k.get("passed")]
        bad = [k["kernel"] for k in data["kernels"] if k["available"] and not k.get("passed")]
        return f"passed: {', '.join(ok) or 'none'}" + (f"; FAILED: {', '.join(bad)}" if bad else "")
    profile = data.pop("profile", None)
    if profile:
        profiles.append(f"==== {data['name']} ({stage}) ====\n{profile}\n")
    data["stage"] = stage
    results["rows"] = [r for r in results["rows"] if r.get("stage") != stage] + [data]
    return f"{data['tokens_per_s_per_gpu']:,.0f} tok/s/GPU, peak {data['peak_memory_gib']:.1f} GiB"


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _fmt(value, spec: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return missing
    return format(value, spec)


def _machine(env: dict) -> str:
    if not env.get("gpu"):
        return "no GPU"
    return f"{env['gpu']} ({env.get('gpu_memory_gib', '?')} GiB)"


def _kernel_table(kernels: Optional[dict]) -> list[str]:
    if not kernels:
        return []
    compared = kernels.get("reference_groups", kernels["groups"])
    subset = "" if compared == kernels["groups"] else (
        f"; reference on the first {compared} K/V group(s) and their query heads")
    lines = ["", f"## Kernel check ({kernels['dtype']}, {kernels['seq_length']:,}-token rows, "
                 f"{kernels['heads']}/{kernels['groups']} heads x {kernels['head_dim']}; "
                 f"tolerance {kernels['tolerance']:g} relative, gradients twice{subset})", "",
             "| kernel | row | max rel. error (out, dq, dk, dv) | passed | fwd ms | "
             "fwd+bwd ms | fwd+bwd TFLOP/s |", "|---|---|---|---|---|---|---|"]
    for k in kernels["kernels"]:
        if not k["available"] or "error" in k:
            lines.append(f"| {k['kernel']} | - | {k.get('error') or k['reason']} | "
                         f"{'no' if 'error' in k else 'n/a'} | | | |")
            continue
        for row in kernels["rows"]:
            r = k[row]
            errs = ", ".join(f"{r['rel_error'][n]:.1e}" for n in ("out", "dq", "dk", "dv"))
            lines.append(f"| {k['kernel']} | {row} | {errs} | {'yes' if r['passed'] else 'NO'} "
                         f"| {r['forward_ms']:.2f} | {r['forward_backward_ms']:.2f} | "
                         f"{r['forward_backward_tflops']:.0f} |")
    return lines


def render_markdown(results: dict) -> str:
    env = results.get("env", {})
    lines = [f"# GPU kit results ({results.get('started', '?')[:16]} UTC)", "",
             f"Machine: {_machine(env)}; "
             f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn')}), "
             f"transformers "
             f"{env.get('transformers')}, megatron-core {env.get('megatron-core')}, "
             f"nvidia-cudnn-frontend {env.get('nvidia-cudnn-frontend') or 'absent'}, flash-attn "
             f"{env.get('flash-attn') or 'absent'}, Transformer Engine "
             f"{env.get('transformer-engine') or 'absent'}.", ""]
    for command in results.get("commands", []):
        lines.append(f"Command: `{command}`")
    rows = results.get("rows", [])
    if rows:
        first = rows[0]
        lines += ["", f"## Throughput: `{RECIPE}` ({first['seq_length']:,}-token packed rows, "
                      f"global batch {first['global_batch_size']}, {first['layers']} layers, "
                      f"hidden {first['hidden_size']})", "",
                  "| run | tokens/s/GPU | TFLOP/s/GPU | MFU | peak memory (GiB) | s/step "
                  "(median) | timed steps | recompute |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
            lines.append(f"| {r['name']} | {_fmt(r['tokens_per_s_per_gpu'], ',.0f')} | "
                         f"{_fmt(r['tflops_per_gpu'], '.1f')} | {mfu} | "
                         f"{_fmt(r['peak_memory_gib'], '.1f')} | {_fmt(r['step_time_s'], '.2f')} "
                         f"| {r['timed_steps']} | {r.get('recompute') or '-'} |")
        ours = [r for r in rows if r.get("kind") == "megatron-prolong"]
        peers = [r for r in rows if r.get("kind") == "hf-peer"]
        if ours and peers:
            best = max(ours, key=lambda r: r["tokens_per_s_per_gpu"])
            peer = max(peers, key=lambda r: r["tokens_per_s_per_gpu"])
            lines += ["", f"Best of ours ({best['name']}) / HF peer ({peer['name']}): "
                          f"{best['tokens_per_s_per_gpu'] / peer['tokens_per_s_per_gpu']:.2f}x "
                          "tokens/s."]
        lines += ["", "MFU: model FLOPs with attention counted inside documents only "
                      "(training/metrics.py), over the GPU's dense bf16 peak."]
    for key in ("kernels", "kernels_512k"):
        lines += _kernel_table(results.get(key))
    if results.get("tests"):
        lines += ["", "## pytest -m gpu", "",
                  ", ".join(f"{n} {w}" for w, n in results["tests"].items())]
    lines += ["", "## Stages", "", "| stage | status | seconds | note |", "|---|---|---|---|"]
    for s in results.get("stages", []):
        lines.append(f"| {s['stage']} | {s['status']} | {s['seconds']:.0f} | {s['note']} |")
    if results.get("deferred"):
        lines += ["", f"Deferred (run next): `bash tools/gpu_kit/run.sh OUT_DIR "
                      f"{' '.join(results['deferred'])}`"]
    return "\n".join(lines) + "\n"


def write_results(out: str, results: dict, profiles: list[str]) -> None:
    os.makedirs(out, exist_ok=True)
    for name, text in (("results.json", json.dumps(results, indent=1, default=str)),
                       ("results.md", render_markdown(results))):
        tmp = os.path.join(out, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))
    if profiles:
        with open(os.path.join(out, "profiles.txt"), "w") as f:
            f.write("\n".join(profiles))


def merge(out: str, paths: list[str]) -> dict:
    merged = {"started": None, "commands": [], "env": {}, "stages": [], "rows": [],
              "deferred": []}
    for path in paths:
        with open(path) as f:
            part = json.load(f)
        merged["started"] = merged["started"] or part.get("started")
        merged["commands"] += part.get("commands", [])
        merged["env"] = part.get("env") or merged["env"]
        merged["stages"] += part.get("stages", [])
        names = {r["name"] for r in part.get("rows", [])}
        merged["rows"] = [r for r in merged["rows"] if r["name"] not in names] + part.get("rows", [])
        for key in ("kernels", "kernels_512k", "tests"):
            if part.get(key):
                merged[key] = part[key]
        merged["deferred"] = part.get("deferred", [])
    write_results(out, merged, [])
    return merged


# ---------------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    ns = parse_args(argv)
    if ns.probe:
        print(json.dumps(probe(ns.tiny)))
        return 0
    if ns.merge:
        merged = merge(ns.out, ns.merge)
        print(render_markdown(merged))
        return 0
    start = _now()
    wanted = [s for s in (ns.stages or list(STAGES)) if s != "env"]
    for stage in wanted:
        if stage.partition(":")[0] not in LIMITS:
            print(f"error: unknown stage {stage!r}: choose {', '.join(STAGES)}, bench:BACKEND "
                  "or peer:ATTENTION", file=sys.stderr)
            return 2
    results = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "commands": ["bash tools/gpu_kit/run.sh OUT_DIR " + " ".join(
                   (argv if argv is not None else sys.argv[1:])[1:])],
               "env": {}, "stages": [], "rows": [], "deferred": []}
    profiles: list[str] = []
    os.makedirs(ns.out, exist_ok=True)
    queue = ["env"] + wanted
    with tempfile.TemporaryDirectory(prefix="gpu_kit_") as parts, \
            open(os.path.join(ns.out, "kit.log"), "w") as log:
        while queue:
            stage = queue.pop(0)
            left = ns.budget_s - (_now() - start) - RESERVE_S
            limit, least = LIMITS[stage.partition(":")[0]]
            if left < least:
                results["deferred"] = [stage] + queue
                break
            header = f"\n[kit] ==== {stage} (limit {min(limit, left):.0f} s) ===="
            print(header, flush=True)
            log.write(header + "\n")
            began = _now()
            try:
                rc, tail = run_process(stage_command(stage, ns, parts), min(limit, left), log)
                note = collect(stage, rc, tail, parts, results, profiles)
            except Exception as exc:  # the kit itself must not stop at one stage's surprise
                rc, tail, note = -1, "", f"{type(exc).__name__}: {exc}"
            status = "ok" if rc == 0 else "timed out" if rc is None else f"failed (exit {rc})"
            results["stages"].append(dict(stage=stage, status=status, seconds=_now() -
                                          began, note=note))
            print(f"[kit] {stage}: {status} in {_now() - began:.0f} s: {note}",
                  flush=True)
            if stage == "env":  # "bench" becomes one stage per backend that can run here
                queue = expand(wanted, results["env"])
            if stage.startswith("peer:") or stage == "peer":
                if rc not in (0, None) and "out of memory" in tail.lower():
                    # fp32 master weights (HF Trainer's way) may not fit one GPU beside 64K
                    # activations: measure the peer with bf16 weights rather than not at all.
                    queue.insert(0, stage.replace("peer", "peer-bf16", 1))
            write_results(ns.out, results, profiles)
    write_results(ns.out, results, profiles)
    print("\n" + render_markdown(results), flush=True)
    if results["deferred"]:
        print(f"[kit] out of budget; next: bash tools/gpu_kit/run.sh OUT_DIR "
              f"{' '.join(results['deferred'])}", flush=True)
    failed = [s for s in results["stages"] if s["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
