#!/usr/bin/env python
"""Evaluate a checkpoint on synthetic recall (json_kv, niah_mk) and on held-out validation rows.

  megatron checkpoint  a training run directory (its checkpoints/latest; --all-steps: every
                       step_* kept), a step_N directory, or a weights directory (tools/convert.py
                       hf-to-mcore); any layout it was saved at, evaluated by default at
                       TP=PP=CP=1 in the processes this runs in (one process, or torchrun: data
                       parallel); key=value overrides such as parallel.tensor=2
                       parallel.context=4 (context parallelism for long lengths), or
                       --saved-layout for the run's own.
  --hf DIR             a Hugging Face directory through transformers: the independent reference.

Recall examples are generated from a seed (or read with --examples-file) and scored in one
forward pass each: exact match (greedy decoding would produce the gold answer), answer token
accuracy and the answer's mean log-likelihood. Defaults come from the run's `evaluation:`
section. Results: OUT/results.json (or OUT/step_N.json per checkpoint with --all-steps),
OUT/recall_heatmap.png, OUT/history.png (--all-steps), the table on stdout.
Exit status 2 for input errors (the message says which and what to do).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="megatron checkpoint: run, step_N or weights directory")
    src.add_argument("--hf", help="Hugging Face model directory (transformers reference)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides for the megatron model, e.g. parallel.tensor=2")
    p.add_argument("--saved-layout", action="store_true",
                   help="split the model as the run's config says (parallel.tensor/pipeline/"
                   "context; launch that many processes) instead of TP=PP=CP=1 across the "
                   "processes this runs in")
    p.add_argument("--config", help="run config or model YAML (default: found next to the "
                   "checkpoint: model.yaml, or the run's config.yaml)")
    p.add_argument("--tasks", nargs="+", help="json_kv niah_mk (default: the run's "
                   "evaluation.recall_tasks, else both); 'none' skips recall")
    p.add_argument("--lengths", nargs="+", type=int,
                   help="lengths in tokens, prompt + answer (default: the run's, else seq_length)")
    p.add_argument("--depths", nargs="+", type=float, help="depths in [0, 1]")
    p.add_argument("--examples", type=int, help="examples per task x length x depth")
    p.add_argument("--template", choices=("plain", "chat"),
                   help="plain (base models) or chat (Llama-3 instruct template)")
    p.add_argument("--seed", type=int, help="recall seed (default: the run's recall_seed)")
    p.add_argument("--examples-file", help="score the examples of this JSONL file instead")
    p.add_argument("--save-examples", help="write the examples scored to this JSONL file")
    p.add_argument("--validation", action="store_true",
                   help="also the validation loss on the run's held-out rows (needs a run config)")
    p.add_argument("--all-steps", action="store_true",
                   help="every checkpoint of the run directory, for a history chart")
    p.add_argument("--tokenizer", help="byte | llama3 | sentencepiece | hf (default: the run's "
                   "data tokenizer; for --hf, DIR's tokenizer.json, not needed with "
                   "--examples-file)")
    p.add_argument("--tokenizer-path", help="the tokenizer's model file or directory")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                   help="compute precision (default: the run's; fp32 for --hf)")
    p.add_argument("--out", help="results directory (default: eval_results/<checkpoint name>)")
    p.add_argument("--no-plots", action="store_true", help="write no PNG")
    return p


class Progress:
    """A one-line progress bar on stderr (rank 0 only)."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label, self.enabled, self.start = label, enabled, time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (total - done) if done else 0.0
        bar = "#" * (24 * done // max(total, 1))
        print(f"\r{self.label} [{bar:<24}] {done}/{total} examples, {elapsed:.0f} s elapsed, "
              f"{eta:.0f} s left", end="\n" if done >= total else "", file=sys.stderr, flush=True)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def recall_settings(args, cfg) -> dict:
    """Command line first, then the run's evaluation section, then defaults."""
    from megatron_prolong.config import RECALL_TASKS

    e = cfg.evaluation if cfg is not None else None
    seq = cfg.training.seq_length if cfg is not None else None
    tasks = args.tasks or (e.recall_tasks if e and e.recall_tasks else list(RECALL_TASKS))
    lengths = args.lengths or (e.recall_lengths if e and e.recall_lengths else None) or (
        [seq] if seq else None)
    if tasks != ["none"] and not lengths and not args.examples_file:
        raise ValueError("--lengths is required (no run config to take them from)")
    return dict(tasks=[] if tasks == ["none"] else tasks, lengths=lengths,
                depths=args.depths or (e.recall_depths if e else [0.0, 0.25, 0.5, 0.75, 1.0]),
                examples=args.examples or (e.recall_examples if e else 1),
                template=args.template or (e.recall_template if e else "plain"),
                seed=args.seed if args.seed is not None else (e.recall_seed if e else 0))


def make_examples(args, cfg, tokenizer, rank: int = 0):
    """Every rank generates (or reads) the same examples; rank 0 alone writes --save-examples."""
    from megatron_prolong.evaluation.tasks import generate_examples, load_examples, save_examples

    if args.examples_file:
        examples = load_examples(args.examples_file)
    else:
        s = recall_settings(args, cfg)
        examples = generate_examples(s["tasks"], tokenizer, s["lengths"], s["depths"],
                                     s["examples"], s["seed"], s["template"])
    if args.save_examples and rank == 0:
        save_examples(examples, args.save_examples)
    return examples


def finish(args, name: str, record: dict, recall, out: str, history=None, title="",
           train_loss=None) -> None:
    from megatron_prolong.evaluation.report import eval_line, recall_table
    from megatron_prolong.evaluation.session import write_results

    print(eval_line(record))
    if recall:
        print(recall_table(recall, f"{title} recall".strip()))
    written = write_results(out, name, record, recall, history, not args.no_plots, title,
                            train_loss)
    print("wrote " + ", ".join(written))


# ---------------------------------------------------------------------------------------------
# Hugging Face
# ---------------------------------------------------------------------------------------------
def evaluate_hf(args) -> int:
    import torch

    from megatron_prolong.config import load_config
    from megatron_prolong.convert.directories import require_hf_directory
    from megatron_prolong.evaluation.hf_reference import (hf_score_examples, hf_validation,
                                                          load_hf_model)
    from megatron_prolong.evaluation.recall import recall_records, summarize
    from megatron_prolong.evaluation.report import eval_record

    # Checked here, before transformers is asked: a path that is not a local HF directory
    # would otherwise be tried as a hub repository name.
    require_hf_directory(args.hf, "--hf", "evaluate it with `tools/evaluate.py --checkpoint "
                         f"{args.hf}`, or export it with `tools/convert.py mcore-to-hf`")
    cfg = load_config(args.config, args.overrides) if args.config else None
    tokenizer = hf_tokenizer(args)
    try:
        with hub_offline():  # a local directory: nothing to ask the hub
            model = load_hf_model(args.hf, torch.bfloat16 if args.dtype == "bf16"
                                  else torch.float32,
                                  "cuda" if torch.cuda.is_available() else "cpu")
    except OSError as exc:  # transformers' word for weights or files it cannot find or read
        raise ValueError(f"--hf {args.hf}: transformers cannot load it: "
                         + " ".join(str(exc).split())) from None
    vocab = model.get_input_embeddings().weight.shape[0]
    if tokenizer is not None and tokenizer.vocab_size > vocab:
        raise ValueError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but the "
                         f"model in {args.hf} has only {vocab} embedding rows: ids would index "
                         "past the embedding. Use the model's own tokenizer (--tokenizer hf "
                         "--tokenizer-path DIR)")
    examples = make_examples(args, cfg, tokenizer)
    check_example_ids(examples, vocab, args.examples_file or "the generated examples")
    recall = None
    if examples:
        scores = hf_score_examples(model, examples, Progress("recall", True))
        recall = summarize(recall_records(examples, scores))
    validation = None
    if args.validation:
        if cfg is None:
            raise ValueError("--validation with --hf needs --config RUN_DIR/config.yaml (the "
                             "run's data and held-out set)")
        samples, settings = validation_rows(cfg, rank=0)
        validation = hf_validation(model, samples, settings)
    out = args.out or os.path.join("eval_results", os.path.basename(os.path.normpath(args.hf)))
    finish(args, "results", eval_record(None, validation, recall), recall, out,
           title=os.path.basename(os.path.normpath(args.hf)))
    return 0


@contextlib.contextmanager
def hub_offline():
    """HF_HUB_OFFLINE=1 for the load (besides local_files_only), as it was afterwards."""
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = before


def hf_tokenizer(args):
    """--tokenizer, else DIR's tokenizer.json; None when nothing is generated (--examples-file
    holds token ids; --tasks none) and DIR has none (an export written without
    --tokenizer-dir)."""
    from megatron_prolong.data.tokenizer import build_tokenizer

    if args.tokenizer:
        return build_tokenizer(args.tokenizer, args.tokenizer_path)
    path = args.tokenizer_path or args.hf
    found = os.path.isfile(os.path.join(path, "tokenizer.json")) if os.path.isdir(path) \
        else os.path.isfile(path)
    if not found and (args.examples_file or args.tasks == ["none"]):
        return None
    if not found:
        raise ValueError(f"--hf {args.hf}: no tokenizer.json to generate recall examples with; "
                         "pass --tokenizer KIND --tokenizer-path PATH, or --examples-file with "
                         "token ids (e.g. written by --save-examples), or export with "
                         "`tools/convert.py mcore-to-hf --tokenizer-dir DIR`")
    return build_tokenizer("hf", path)


def check_example_ids(examples, vocab: int, where: str) -> None:
    """Token ids the model's embedding cannot look up: refuse by name, not IndexError."""
    for ex in examples:
        bad = next((i for i in ex.prompt_ids + ex.answer_ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise ValueError(f"{where}: example {ex.task} #{ex.index} holds token id {bad}, "
                             f"outside the model's embedding of {vocab} rows; the examples were "
                             "made with another tokenizer")


def validation_rows(cfg, rank: int, layout=None):
    """The run's held-out rows (what its training-time evaluation scores) and their settings."""
    from megatron_prolong.config import Layout
    from megatron_prolong.evaluation.validation import ValidationSettings
    from megatron_prolong.training.data_source import build_data_source, build_validation_samples

    layout = layout or Layout(1, 1, 1, 1, 1, 1)
    source = build_data_source(cfg, layout, 0, rank=rank)
    samples = build_validation_samples(cfg, source.data_cfg)
    if not samples:
        raise ValueError("the run holds nothing out: set evaluation.heldout_docs (or "
                         "heldout_fraction / validation_mixture) in its config")
    return samples, ValidationSettings.for_run(cfg, samples)


# ---------------------------------------------------------------------------------------------
# megatron
# ---------------------------------------------------------------------------------------------
LAYOUT_KEYS = ("parallel.tensor", "parallel.pipeline", "parallel.context")


def layout_overrides(args) -> list[str]:
    """By default the model is split as the processes this tool runs in allow, TP=PP=CP=1 with
    every process a data-parallel replica, not as the run's config says (a TP2 x PP2 run's
    checkpoint then evaluates in one process: dist checkpoints reshard on load). A
    parallel.* override on the command line wins; --saved-layout keeps the run's."""
    if args.saved_layout:
        return []
    given = {o.split("=", 1)[0].strip() for o in args.overrides}
    out = [f"{key}=1" for key in LAYOUT_KEYS if key not in given]
    if "parallel.tensor" not in given and "parallel.sequence_parallel" not in given:
        out.append("parallel.sequence_parallel=false")  # needs TP > 1
    return out


def checkpoints_to_evaluate(path: str, all_steps: bool) -> list[str]:
    from megatron_prolong.training.checkpoint import CheckpointManager, resolve_checkpoint

    if not all_steps:
        return [resolve_checkpoint(path)]
    for save_dir in (os.path.join(path, "checkpoints"), path):
        steps = CheckpointManager(save_dir).complete_checkpoints()
        if steps:
            return steps
    raise ValueError(f"--all-steps: no step_* checkpoints under {path}")


def evaluate_megatron(args) -> int:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_prolong.config import load_config, validate
    from megatron_prolong.convert.directories import require_megatron_checkpoint
    from megatron_prolong.convert.mcore_to_hf import find_model_config
    from megatron_prolong.data.tokenizer import build_tokenizer, check_tokenizer_matches_model
    from megatron_prolong.evaluation.session import evaluate, read_training_loss
    from megatron_prolong.training.checkpoint import (CheckpointGone, load_weights_only,
                                                      resolve_checkpoint, step_dir_name)
    from megatron_prolong.training.data_source import run_tokenizer
    from megatron_prolong.training.parallel import (destroy_model_parallel, init_distributed,
                                                    init_model_parallel)
    from megatron_prolong.training.step import build_model_chunks

    require_megatron_checkpoint(args.checkpoint, "--checkpoint", "evaluate it with "
                                f"`tools/evaluate.py --hf {args.checkpoint}`")
    checkpoints = checkpoints_to_evaluate(args.checkpoint, args.all_steps)
    config_path = args.config or find_model_config(checkpoints[-1])
    overrides = list(args.overrides) + ([f"training.precision={args.dtype}"] if args.dtype else [])
    saved = load_config(config_path, overrides).parallel
    cfg = load_config(config_path, layout_overrides(args) + overrides)
    runtime = init_distributed(cfg.training.device)
    p = cfg.parallel
    dp = max(1, runtime.world_size // (p.tensor * p.pipeline * p.context))
    cfg.training.micro_batch_size, cfg.training.global_batch_size = 1, dp  # no batches here
    layout = validate(cfg, runtime.world_size)
    init_model_parallel(layout, cfg.training.seed)
    try:
        if args.tokenizer:
            tokenizer = build_tokenizer(args.tokenizer, args.tokenizer_path)
            check_tokenizer_matches_model(tokenizer, cfg.model.vocab_size)
        else:
            tokenizer = run_tokenizer(cfg)
        examples = make_examples(args, cfg, tokenizer, runtime.rank)
        check_example_ids(examples, cfg.model.vocab_size,
                          args.examples_file or "the generated examples")
        samples, settings = (validation_rows(cfg, runtime.rank, layout) if args.validation
                             else ([], None))
        chunks = build_model_chunks(cfg, runtime, wrap_ddp=False)
        forward_backward = get_forward_backward_func()
        name = os.path.basename(os.path.normpath(args.checkpoint))
        out = args.out or os.path.join("eval_results", name)
        history = []
        # --all-steps on a run directory: its training loss goes beside the validation loss.
        train_loss = None
        if args.all_steps:  # the run directory, or its checkpoints/ folder
            here = os.path.abspath(args.checkpoint)
            train_loss = read_training_loss(here) or read_training_loss(os.path.dirname(here))
        for checkpoint in checkpoints:
            try:
                progress = load_weights_only(chunks, checkpoint)
            except CheckpointGone as exc:  # a run still training rotated it away (keep_last)
                if args.all_steps:
                    if runtime.rank == 0:
                        print(f"warning: {exc}; skipped", file=sys.stderr)
                    continue
                checkpoint = resolve_checkpoint(args.checkpoint)  # the next complete one
                progress = load_weights_only(chunks, checkpoint)
            step = progress.step if progress is not None else None
            label = f"recall, step {step}" if step is not None else "recall"
            record, recall = evaluate(chunks, forward_backward, step=step, samples=samples,
                                      settings=settings, examples=examples,
                                      progress=Progress(label, runtime.rank == 0))
            history.append(record)
            if runtime.rank == 0:
                file_name = (step_dir_name(step) if args.all_steps and step is not None
                             else "results")
                finish(args, file_name, record, recall, out, history, title=cfg.name,
                       train_loss=train_loss)
        if runtime.rank == 0:
            print(f"layout TP={layout.tp} PP={layout.pp} CP={layout.cp} DP={layout.dp} (the "
                  f"run's config: TP={saved.tensor} PP={saved.pipeline} CP={saved.context}; "
                  "checkpoints load at any layout), "
                  f"checkpoint(s): {', '.join(checkpoints)}")
    finally:
        destroy_model_parallel()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    from megatron_prolong.config import ConfigError
    from megatron_prolong.convert import ConversionError
    from megatron_prolong.data.indexed import DataFileError
    from megatron_prolong.training.checkpoint import CheckpointError

    try:
        return evaluate_hf(args) if args.hf else evaluate_megatron(args)
    except (ConfigError, ConversionError, CheckpointError, DataFileError, ValueError,
            FileNotFoundError) as exc:
        return _fail(str(exc))


if __name__ == "__main__":  # the guard is required: the async checkpoint writer spawns
    sys.exit(main())
