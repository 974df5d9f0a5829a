#!/usr/bin/env python
"""Show what a run will read before it runs: built by the training loader itself
(training/data_source.py: the same mixture, packing, seed and smart batching), so the rows shown
are exactly the rows the first steps train on.

  python tools/inspect_data.py RECIPE.yaml [key=value ...] [--steps K] [--rows N]

Prints (1) the first micro-batches of step 0, each row with its domain, attention cost and every
document segment (length, decoded start and end); (2) each domain's token share over the first
K steps against the mixture's proportions; (3) how many epochs of each domain the run's token
budget consumes, with a warning above --max-epochs; (4) per domain the document-length
histogram, and the distribution of attention cost per row (sum of squared document lengths over
seq_length^2: what smart batching orders by). (4) is also drawn as PNG charts under --plots
(default RUN_DIR/inspect; needs matplotlib: pip install 'megatron-prolong[plots]').

Examples:
  python tools/inspect_data.py examples/demo_cpu.yaml
  python tools/inspect_data.py examples/stage1_64k.yaml data.tokenizer_path=tokenizer.model \\
      --world-size 64 --steps 200 --max-epochs 2
Exit 2: a configuration or data error (one line saying what and where).
"""
import argparse
import json
import os
import sys
from dataclasses import asdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from megatron_prolong.config import ConfigError, load_config, validate  # noqa: E402
from megatron_prolong.data import inspection  # noqa: E402
from megatron_prolong.data.indexed import DataFileError  # noqa: E402
from megatron_prolong.data.mixture import MixtureDataset  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="+", metavar="RECIPE.yaml | key=value")
    p.add_argument("--steps", type=int, default=100,
                   help="K: steps whose rows are counted for shares and costs (default 100, at "
                        "most the run's steps)")
    p.add_argument("--rows", type=int, default=4, help="micro-batches of step 0 shown per rank")
    p.add_argument("--segments", type=int, default=8,
                   help="document segments shown per row (its first and last halves)")
    p.add_argument("--chars", type=int, default=60,
                   help="characters shown from the start and the end of each document segment")
    p.add_argument("--world-size", type=int,
                   help="GPUs of the run (default: tensor x pipeline x context, i.e. one "
                        "data-parallel rank); sets the data-parallel split of each batch")
    p.add_argument("--max-epochs", type=float, default=4.0,
                   help="warn when the budget repeats a domain more often (default 4)")
    p.add_argument("--json", help="also write every figure to this JSON file (for scripts)")
    p.add_argument("--plots", default=None,
                   help="directory for the PNG charts (default RUN_DIR/inspect; 'none': no charts)")
    ns = p.parse_intermixed_args(argv)
    recipes = [a for a in ns.args if "=" not in a]
    if len(recipes) != 1:
        p.error(f"give exactly one recipe, got {recipes}")
    ns.recipe, ns.overrides = recipes[0], [a for a in ns.args if "=" in a]
    return ns


def build(cfg, world_size):
    from megatron_prolong.training.data_source import DataSource, build_data_source, run_tokenizer

    tp, pp, cp = cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.context
    layout = validate(cfg, world_size or tp * pp * cp)
    first = build_data_source(cfg, layout, dp_rank=0, consumed_samples=0, rank=0)
    if not isinstance(first.dataset, MixtureDataset):
        raise ConfigError(f"data.kind={cfg.data.kind}: random rows, nothing to inspect; use a "
                          "demo, mixture or sft recipe")
    sources = [first] + [DataSource(first.dataset, first.domain_names, cfg, layout, r)
                         for r in range(1, layout.dp)]
    return layout, sources, run_tokenizer(cfg, first.data_cfg)


def print_rows(cfg, layout, sources, tokenizer, rows, chars, segments) -> list[dict]:
    print(f"== step 0 as the loader feeds it: {layout.dp} data-parallel rank(s) x "
          f"{layout.num_microbatches} micro-batch(es) of {cfg.training.micro_batch_size} row(s)"
          f" x {cfg.training.seq_length:,} tokens; '||' starts a document segment")
    shown = []
    for r, src in enumerate(sources[:4]):
        for m, batch in enumerate(src.next_step()[:rows]):
            for line in inspection.render_micro_batch(
                    batch, tokenizer, cfg.training.seq_length, chars,
                    header=f"rank {r} micro-batch {m} ", max_segments=segments):
                print(line)
            shown.append({"rank": r, "micro_batch": m, "domains": batch["domains"],
                          "cu_seqlens": batch["cu_seqlens"].tolist()})
    if layout.dp > 4:
        print(f"(ranks 4-{layout.dp - 1} not shown)")
    return shown


def print_shares(shares, steps, samples):
    print(f"\n== token share per domain over the first {steps} steps ({samples:,} rows)")
    print(f"  {'domain':<18}{'target':>8}{'rows':>9}{'row share':>11}{'token share':>13}"
          f"{'diff':>8}")
    for s in shares:
        print(f"  {s.domain:<18}{s.target:>8.3f}{s.samples:>9,}{s.sample_share:>11.3f}"
              f"{s.token_share:>13.3f}{s.token_share - s.target:>+8.3f}")


def print_epochs(epochs, total_steps, total_samples, seq_length, max_epochs):
    print(f"\n== epochs of each domain in the whole run: {total_steps:,} steps, "
          f"{total_samples:,} rows, {total_samples * seq_length:,} tokens")
    print(f"  {'domain':<18}{'mode':>6}{'docs':>10}{'dropped':>9}{'tokens/epoch':>15}"
          f"{'consumed':>15}{'epochs':>8}")
    for e in epochs:
        print(f"  {e.domain:<18}{e.mode:>6}{e.documents:>10,}{e.dropped:>9,}"
              f"{e.tokens_per_epoch:>15,}{e.tokens_consumed:>15,}{e.epochs:>8.2f}")
    for w in inspection.repeat_warnings(epochs, max_epochs):
        print(w)


def print_lengths(lengths):
    print("\n== document lengths per domain (tokens, documents after the domain's filter)")
    for name, lens in lengths.items():
        print(f"  {name}: {len(lens):,} documents, {inspection.percentiles(lens)}")
        for lo, hi, c in inspection.log2_histogram(lens):
            print(f"    [{lo:,}, {hi:,}) {c:,}")


def print_costs(costs, domains, names, samples):
    print(f"\n== attention cost per row over the first {samples:,} rows (sum of squared "
          "segment lengths / seq_length^2; 1.0 = one document fills the row)")
    for name, text in inspection.summarise_costs(costs, domains, names):
        print(f"  {name}: {text}")
    for line in inspection.text_histogram(costs, np.linspace(0, 1, 11)):
        print(line)


def plot(directory, lengths, costs, domains, names, title, seq_length):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(charts skipped: matplotlib is not installed; pip install "
              "'megatron-prolong[plots]')")
        return []
    os.makedirs(directory, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=80)
    top = max((int(v.max()) for v in lengths.values() if len(v)), default=2)
    edges = 2.0 ** np.arange(0, np.ceil(np.log2(max(top, 2))) + 1)
    for name, lens in lengths.items():  # shares, so that small and large domains compare
        ax.hist(lens, bins=edges, weights=np.full(len(lens), 1 / max(len(lens), 1)),
                histtype="step", linewidth=1.6, label=f"{name} ({len(lens):,} documents)")
    ax.axvline(seq_length, color="grey", linestyle="--", linewidth=1)
    ax.annotate(f"seq_length {seq_length:,}", (seq_length, 0.98), ha="right", va="top",
                xycoords=("data", "axes fraction"), fontsize=8, color="grey", rotation=90)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="document length (tokens)", ylabel="share of the domain's documents",
           title=f"{title}: document lengths per domain")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(directory, "document_lengths.png"))
    fig.savefig(paths[-1])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=80)
    bins = np.linspace(0, 1, 41)
    data = [costs[domains == d] for d in range(len(names))]
    ax.hist(data, bins=bins, stacked=True, label=names)
    ax.set(xlabel="attention cost of a row (sum of squared document lengths / seq_length²)",
           ylabel="rows", title=f"{title}: attention cost per row ({len(costs):,} rows)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(directory, "attention_cost.png"))
    fig.savefig(paths[-1])
    plt.close(fig)
    print("\ncharts: " + ", ".join(paths))
    return paths


def main(argv=None) -> int:
    ns = parse_args(argv)
    try:
        cfg = load_config(ns.recipe, ns.overrides)
        layout, sources, tokenizer = build(cfg, ns.world_size)
        dataset = sources[0].dataset
        rows = print_rows(cfg, layout, sources, tokenizer, ns.rows, ns.chars, ns.segments)
        total_steps = cfg.training.total_steps()
        steps = max(1, min(ns.steps, total_steps))
        G = cfg.training.global_batch_size
        shares = inspection.token_shares(dataset, steps * G)
        print_shares(shares, steps, steps * G)
        epochs = inspection.epochs_consumed(dataset, total_steps * G)
        print_epochs(epochs, total_steps, total_steps * G, cfg.training.seq_length,
                     ns.max_epochs)
        lengths = inspection.document_lengths(dataset)
        print_lengths(lengths)
        costs, domains = inspection.row_costs(dataset, steps * G)
        print_costs(costs, domains, dataset.domain_names, steps * G)
    except (ConfigError, ValueError, DataFileError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if ns.json:
        report = {"steps": steps, "rows": rows, "shares": [asdict(s) for s in shares],
                  "epochs": [asdict(e) for e in epochs],
                  "warnings": inspection.repeat_warnings(epochs, ns.max_epochs),
                  "document_length_histogram": {k: inspection.log2_histogram(v)
                                                for k, v in lengths.items()},
                  "row_costs": costs.tolist(),
                  "row_domains": [dataset.domain_names[d] for d in domains]}
        with open(ns.json, "w") as f:
            json.dump(report, f, indent=1)
    if (ns.plots or "").lower() != "none":
        plot(ns.plots or os.path.join(cfg.run_dir, "inspect"), lengths, costs, domains,
             dataset.domain_names, cfg.name, cfg.training.seq_length)
    return 0


if __name__ == "__main__":
    sys.exit(main())
