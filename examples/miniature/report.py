"""The miniature experiment's table and picture, from the evaluation JSONs of a run folder.

    python examples/miniature/report.py runs/miniature/full --markdown docs/miniature.md \
        --picture docs/miniature.png

Reads RUN/seed*/eval/<run>/{all,recall_docs}/results.json (tools/evaluate.py output),
RUN/seed*/timings.tsv and RUN/run.json (examples/miniature/run.sh writes them). Every number is
the mean over seeds; "±" is half the spread between the best and the worst seed. The discussion
in examples/miniature/notes.md (written by hand after looking at the numbers) is copied in.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Optional

import numpy as np

RUNS = {  # evaluation folder -> what it is
    "short": "pre-trained at 512, no continuation",
    "arm_a": "a: 4K, RoPE base 10K (unchanged)",
    "arm_b": "b: 4K, base 500K (ABF), 60% long / 40% short",
    "arm_c": "c: 4K, base 500K, long data only",
    "arm_d": "d: 8K (2x eval), base 1M, 60/40",
}
LENGTHS = (512, 1024, 2048, 4096)
BUCKETS = ("0-512", "512-1K", "1K-2K", "2K-4K")
DOMAINS = ("code", "recall", "text")
NOTES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "notes.md")


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _by_length(results: dict, task: str) -> dict[int, dict[str, float]]:
    """Per length: exact match, answer token accuracy and log-likelihood over the examples."""
    out: dict[int, dict[str, list]] = {}
    for ex in results.get("examples", []):
        if ex["task"] == task:
            cell = out.setdefault(int(ex["length"]), {"exact_match": [], "token_accuracy": [],
                                                      "mean_logprob": []})
            for key in cell:
                cell[key].append(float(ex[key]))
    return {n: {k: float(np.mean(v)) for k, v in cell.items()} for n, cell in out.items()}


def seed_metrics(eval_dir: str) -> dict[str, float]:
    """One run's numbers under flat names (metric/key), from its two results files."""
    both = _load(os.path.join(eval_dir, "all", "results.json"))
    recall_docs = _load(os.path.join(eval_dir, "recall_docs", "results.json"))
    m: dict[str, float] = {"val_loss": both["eval"]["val_loss"]}
    for dom, loss in both["eval"]["val_domain_loss"].items():
        m[f"domain/{dom}"] = loss
    for bucket, loss in both["eval"]["val_position_loss"].items():
        m[f"position_long/{bucket}"] = loss
    for bucket, loss in recall_docs["eval"]["val_position_loss"].items():
        m[f"position_recall/{bucket}"] = loss
    for task, res in (("json_kv", both), ("niah_mk", recall_docs)):
        for length, cell in _by_length(res, task).items():
            for key, value in cell.items():
                m[f"{task}_{key}/{length}"] = value
    return m


def train_facts(seed_dir: str, run: str) -> dict:
    """What the training log says: the checkpoint it started from and its last step."""
    name = "pretrain" if run == "short" else run
    facts = {"loaded": None, "steps": None, "tokens_per_step": None}
    path = os.path.join(seed_dir, f"{name}.log")
    if not os.path.exists(path):
        return facts
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("initialised weights"):
                facts["loaded"] = line.split(" from ", 1)[1].split(";")[0].strip()
            elif line.startswith("training ") and "tokens/step" in line:
                facts["tokens_per_step"] = int(line.split(" tokens/step")[0].split()[-1]
                                               .replace(",", ""))
            elif line.startswith("finished "):
                facts["steps"] = int(line.split(" at step ")[1].split(":")[0])
            elif line.startswith("nothing to do: ") and " complete at step " in line:
                facts["steps"] = int(line.split(" complete at step ")[1].split()[0])
    return facts


def timings(seed_dirs: list[str]) -> dict[str, tuple[float, float]]:
    """Phase -> (wall seconds, CPU seconds) summed over seeds (and over resumed attempts)."""
    out: dict[str, list[float]] = {}
    for d in seed_dirs:
        path = os.path.join(d, "timings.tsv")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 4:
                    continue  # e.g. /usr/bin/time's "Command exited with non-zero status"
                phase = parts[0].split("_")[0] if parts[0].startswith("eval") else parts[0]
                t = out.setdefault(phase, [0.0, 0.0])
                t[0] += float(parts[1])
                t[1] += float(parts[2]) + float(parts[3])
    return {k: (v[0], v[1]) for k, v in out.items()}


def collect(run_dir: str) -> tuple[dict, dict, list[str]]:
    """(run -> metric -> per-seed values, run -> per-seed training facts, seed names)."""
    seed_dirs = sorted(glob.glob(os.path.join(run_dir, "seed*")))
    values: dict[str, dict[str, list[float]]] = {}
    facts: dict[str, list[dict]] = {}
    for sd in seed_dirs:
        for run in RUNS:
            eval_dir = os.path.join(sd, "eval", run)
            if not os.path.exists(os.path.join(eval_dir, "recall_docs", "results.json")):
                continue
            for key, v in seed_metrics(eval_dir).items():
                values.setdefault(run, {}).setdefault(key, []).append(v)
            facts.setdefault(run, []).append(train_facts(sd, run))
    return values, facts, [os.path.basename(d) for d in seed_dirs]


def _fmt(vals: Optional[list[float]], digits: int = 3) -> str:
    if not vals:
        return "n/a"
    mean, half = float(np.mean(vals)), (max(vals) - min(vals)) / 2
    return f"{mean:.{digits}f} ±{half:.{digits}f}" if len(vals) > 1 else f"{mean:.{digits}f}"


def table(values: dict, title: str, columns: list[tuple[str, str]], digits: int = 3) -> str:
    """A markdown table: one row per run, one column per (header, metric key)."""
    lines = [f"**{title}**", "", "| run | " + " | ".join(h for h, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for run, label in RUNS.items():
        if run in values:
            lines.append(f"| {label} | " + " | ".join(_fmt(values[run].get(k), digits)
                                                     for _, k in columns) + " |")
    return "\n".join(lines) + "\n"


def _length_name(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 else str(n)


def effect(values: dict, first: str, second: str, key: str, higher_is_better: bool) -> str:
    """How much better `first` is than `second` on one metric (mean over seeds; negative:
    worse), and whether the seeds separate them: with two seeds per arm, the only claim made
    is "every seed of one beats every seed of the other"."""
    if key not in values.get(first, {}) or key not in values.get(second, {}):
        return "n/a"
    sign = 1.0 if higher_is_better else -1.0
    a = [sign * v for v in values[first][key]]
    b = [sign * v for v in values[second][key]]
    diff = float(np.mean(a) - np.mean(b))
    if abs(diff) < 5e-4:
        verdict = "no difference"
    elif len(a) < 2 or len(b) < 2:
        verdict = "one seed: no spread to compare with"
    elif min(a) > max(b):
        verdict = f"every seed of {_short(first)} better than every seed of {_short(second)}"
    elif max(a) < min(b):
        verdict = f"every seed of {_short(first)} worse than every seed of {_short(second)}"
    else:
        verdict = "within the seed spread"
    return f"{diff:+.3f} ({verdict})"


def _short(run: str) -> str:
    return run.replace("arm_", "")


def effects(values: dict) -> str:
    """The comparisons the issue asks about, each on the figure that should show it."""
    rows = [
        ("continued pre-training at 4K (b vs the short model), recall documents at 2K-4K",
         "arm_b", "short", "position_recall/2K-4K", False),
        ("ABF: raising the RoPE base (b vs a), recall documents at 2K-4K", "arm_b", "arm_a",
         "position_recall/2K-4K", False),
        ("ABF: raising the RoPE base (b vs a), json_kv answer log-lik at 4K", "arm_b", "arm_a",
         "json_kv_mean_logprob/4096", True),
        ("short data keeps short quality (b vs c), short-document loss", "arm_b", "arm_c",
         "domain/text", False),
        ("short data (b vs c), recall documents at 2K-4K", "arm_b", "arm_c",
         "position_recall/2K-4K", False),
        ("training beyond the evaluation length (d vs b), recall documents at 2K-4K", "arm_d",
         "arm_b", "position_recall/2K-4K", False),
        ("training beyond the evaluation length (d vs b), json_kv answer log-lik at 4K",
         "arm_d", "arm_b", "json_kv_mean_logprob/4096", True),
    ]
    lines = ["| effect | metric | first minus second, as an improvement (mean over seeds) |",
             "|---|---|---|"]
    for text, better, worse, key, higher in rows:
        lines.append(f"| {text} | `{key}` | {effect(values, better, worse, key, higher)} |")
    return "\n".join(lines) + "\n"


def picture(values: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("validation loss by position: recall documents", "position_recall/{}", BUCKETS,
         "loss (nats/token)"),
        ("validation loss by position: code + recall", "position_long/{}", BUCKETS,
         "loss (nats/token)"),
        ("json_kv: answer log-likelihood", "json_kv_mean_logprob/{}", LENGTHS,
         "mean log-prob per answer token"),
        ("niah_mk: answer log-likelihood", "niah_mk_mean_logprob/{}", LENGTHS,
         "mean log-prob per answer token"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for ax, (title, key, xs, ylabel) in zip(axes.flat, panels):
        labels = [x if isinstance(x, str) else _length_name(x) for x in xs]
        for run, label in RUNS.items():
            if run not in values:
                continue
            pts = [(i, values[run].get(key.format(x))) for i, x in enumerate(xs)]
            pts = [(i, v) for i, v in pts if v]
            if not pts:
                continue
            idx = [i for i, _ in pts]
            mean = np.array([np.mean(v) for _, v in pts])
            lo = mean - np.array([min(v) for _, v in pts])
            hi = np.array([max(v) for _, v in pts]) - mean
            ax.errorbar(idx, mean, yerr=[lo, hi], marker="o", capsize=3, label=label,
                        linestyle="--" if run == "short" else "-")
        ax.set_xticks(range(len(xs)), labels)
        ax.set_xlabel("tokens of context before the token" if "position" in key
                      else "example length (tokens)")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("ProLong in miniature: tiny model, pre-trained at 512 tokens, continued at 8x "
                 "(mean over seeds; bars: min-max)", fontsize=11)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def markdown(run_dir: str, values: dict, facts: dict, seeds: list[str], picture_name: str
             ) -> str:
    info = _load(os.path.join(run_dir, "run.json")) if os.path.exists(
        os.path.join(run_dir, "run.json")) else {}
    times = timings(sorted(glob.glob(os.path.join(run_dir, "seed*"))))
    cpu = sum(c for _, c in times.values())
    out = ["# ProLong in miniature", "",
           "The recipe's stages, run through this code at a size one CPU can run: a `tiny` "
           "Llama-3-shaped model (4 layers, hidden 128, 8 query heads / 4 KV groups, byte "
           "tokenizer) pre-trained at 512 tokens with RoPE base 10,000, then continued from "
           "that checkpoint at 8x the length in four arms with the same token budget, each "
           "scored by `tools/evaluate.py` on the same held-out data at 512, 1K, 2K and 4K "
           "tokens.", "",
           f"- command: `{info.get('command', 'bash examples/miniature/run.sh')}` "
           f"(scale `{info.get('scale', '?')}`), finished {info.get('finished', '?')}",
           f"- seeds: {', '.join(seeds)} (each seed pre-trains its own short model; its four "
           "arms start from it); numbers are the mean over seeds, ± half the spread between "
           "them",
           f"- time: the last invocation {info.get('wall_seconds', 0) / 60:.1f} min wall "
           f"clock with up to {info.get('jobs', '?')} runs side by side on "
           f"{info.get('cpus', '?')} CPU cores (load average at its start: "
           f"{info.get('load_average_at_start', '?')}); {cpu / 60:.1f} CPU-minutes in all "
           "(per phase, summed over seeds and resumed invocations: "
           + ", ".join(f"{k} {c / 60:.1f}" for k, (_, c) in times.items()) + ")",
           "", f"![recall and loss by position, one line per arm]({picture_name})", ""]
    out += ["## The runs", "",
            "| run | training | started from (its log) | steps x tokens/step |",
            "|---|---|---|---|"]
    setups = {
        "short": "512 tokens, base 10,000, short mixture (`pretrain.yaml`)",
        "arm_a": "`continue.yaml` model.rotary_base=10000",
        "arm_b": "`continue.yaml` (4,096 tokens, base 500,000, `mix_long_short.yaml`)",
        "arm_c": "`continue.yaml` data.mixture=mix_long_only.yaml",
        "arm_d": "`continue.yaml` training.seq_length=8192 model.rotary_base=1000000, half "
                 "the rows per step",
    }
    for run, label in RUNS.items():
        if run not in facts:
            continue
        loaded = sorted({os.path.relpath(f["loaded"], run_dir) if f["loaded"] else "random"
                         for f in facts[run]})
        steps = sorted({f"{f['steps']} x {f['tokens_per_step']:,}" for f in facts[run]
                        if f["steps"] is not None and f["tokens_per_step"]})
        out.append(f"| {label} | {setups[run]} | {', '.join(loaded)} | {', '.join(steps)} |")
    out += ["", "## Effects", "", effects(values), "## Tables", "",
            "Validation: 4,096-token documents of standard-library packages and recall "
            "documents that no run trains on, and the held-out packages' docstrings (short "
            "documents); every run is scored at 4,096 tokens whatever its training length. "
            "Recall: `json_kv` and `niah_mk` (plain template) generated from the same seed "
            "for every run; niah_mk's fixed text alone takes 539 byte tokens, so it starts "
            "at 1K.", ""]
    out.append(table(values, "Validation loss by position, recall documents (nats/token; "
                     "lower is better)", [(b, f"position_recall/{b}") for b in BUCKETS]))
    out.append(table(values, "Validation loss by position, code + recall documents",
                     [(b, f"position_long/{b}") for b in BUCKETS]))
    out.append(table(values, "Validation loss per domain (text: short documents)",
                     [(d, f"domain/{d}") for d in DOMAINS] + [("all", "val_loss")]))
    for task in ("json_kv", "niah_mk"):
        out.append(table(values, f"{task}: answer mean log-likelihood (nats/token; higher is "
                         "better)", [(_length_name(n), f"{task}_mean_logprob/{n}")
                                     for n in LENGTHS]))
        out.append(table(values, f"{task}: answer token accuracy / exact match",
                         [(f"{_length_name(n)} acc", f"{task}_token_accuracy/{n}")
                          for n in LENGTHS] +
                         [(f"{_length_name(n)} EM", f"{task}_exact_match/{n}")
                          for n in LENGTHS], digits=2))
    if os.path.exists(NOTES):
        with open(NOTES) as f:
            out += ["", f.read().strip(), ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the run folder of examples/miniature/run.sh")
    parser.add_argument("--markdown", required=True, help="the table's file (docs/miniature.md)")
    parser.add_argument("--picture", required=True, help="the picture (docs/miniature.png)")
    args = parser.parse_args(argv)
    values, facts, seeds = collect(args.run_dir)
    if not values:
        print(f"error: no evaluation results under {args.run_dir}/seed*/eval/; run "
              "examples/miniature/run.sh first", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.picture)), exist_ok=True)
    picture(values, args.picture)
    text = markdown(args.run_dir, values, facts, seeds,
                    os.path.relpath(args.picture, os.path.dirname(os.path.abspath(args.markdown))))
    tmp = args.markdown + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, args.markdown)
    print(f"wrote {args.markdown} and {args.picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
