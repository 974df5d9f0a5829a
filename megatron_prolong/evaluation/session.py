"""One evaluation of a model (validation and recall) and the files it leaves.

Used by the training loop (training/periodic_eval.py, every `evaluation.interval` steps) and by
tools/evaluate.py (any checkpoint). Files, in one directory:
  <name>.json            the record (what metrics.jsonl holds) plus every recall example's scores
  recall_heatmap.png     exact match, answer token accuracy and log-likelihood by length x
                         depth, a panel per metric and task
  history.png            training and validation loss, and recall, against training steps
                         (several steps only)
"""
from __future__ import annotations

import glob
import json
import os
from typing import Callable, Optional

from megatron_prolong.atomic_file import write_text_atomically
from megatron_prolong.evaluation import plots
from megatron_prolong.evaluation.recall import recall_records, score_examples, summarize
from megatron_prolong.evaluation.report import eval_record
from megatron_prolong.evaluation.tasks import Example
from megatron_prolong.evaluation.validation import ValidationSettings, run_validation


def evaluate(model: list, forward_backward: Callable, *, step: Optional[int],
             samples: list, settings: Optional[ValidationSettings], examples: list[Example],
             progress: Optional[Callable[[int, int], None]] = None) -> tuple[dict, Optional[dict]]:
    """Collective. (record, recall summary with per-example rows, or None without examples)."""
    validation = (run_validation(model, forward_backward, samples, settings)
                  if samples and settings is not None else None)
    recall = None
    if examples:
        scores = score_examples(model, forward_backward, examples, progress)
        recall = summarize(recall_records(examples, scores))
    return eval_record(step, validation, recall), recall


def write_results(directory: str, name: str, record: dict, recall: Optional[dict],
                  history: Optional[list[dict]] = None, make_plots: bool = True,
                  title: str = "", train_loss: Optional[list] = None) -> list[str]:
    """Write the JSON (atomically) and the pictures; returns the paths written."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}.json")
    document = dict(record, examples=(recall or {}).get("examples", []))
    write_text_atomically(path, json.dumps(document, indent=1))
    written = [path]
    if make_plots and not plots.matplotlib_available():
        _say_once("no PNG written: matplotlib is not installed (pip install -e '.[plots]')")
    elif make_plots:
        if recall:
            written.append(plots.recall_heatmap(recall, os.path.join(directory,
                                                                     "recall_heatmap.png"),
                                                title=f"{title} recall".strip()))
        if history and len(history) > 1:
            written.append(plots.history_chart(history, os.path.join(directory, "history.png"),
                                               title=title or "evaluation",
                                               train_loss=train_loss))
    return [p for p in written if p]


_said: set = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        print(f"evaluation: {message}", flush=True)


def read_history(directory: str, up_to_step: Optional[int] = None) -> list[dict]:
    """The records of earlier evaluations in `directory` (step_*.json), in step order."""
    out = []
    for path in sorted(glob.glob(os.path.join(directory, "step_*.json"))):
        with open(path) as f:
            record = json.load(f)
        if up_to_step is None or (record.get("step") or 0) <= up_to_step:
            out.append({"step": record.get("step"), "eval": record.get("eval", {})})
    return out


def read_training_loss(run_dir: str) -> list[tuple[int, float]]:
    """(step, loss) of every training step in run_dir/metrics.jsonl (evaluation records and
    skipped steps left out); [] when there is none. A torn or foreign line is passed over."""
    path = os.path.join(run_dir, "metrics.jsonl")
    out = []
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if (isinstance(record, dict) and "eval" not in record
                    and isinstance(record.get("step"), int)
                    and isinstance(record.get("loss"), (int, float))):
                out.append((record["step"], float(record["loss"])))
    return out
