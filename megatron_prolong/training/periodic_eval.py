"""Evaluation during training: every `evaluation.interval` steps and at the last step, the model
being trained is scored on the held-out validation rows and the synthetic recall tasks
(megatron_prolong/evaluation), on every rank together, in its current layout.

Results: a console line (and the recall table at the last step), a record in metrics.jsonl,
TensorBoard scalars (val/*, val_domain/*, val_position/*, recall*/), and run_dir/eval/:
step_N.json, recall_heatmap.png (latest), history.png (every evaluation so far, beside the
training loss of metrics.jsonl).
Validation rows and recall examples are built once, before the first step, so that settings they
cannot satisfy (a recall length too short for its task) stop the run at start with one line.
"""
from __future__ import annotations

import os
import time

from megatron_prolong.config import ConfigError, RunConfig
from megatron_prolong.evaluation.report import eval_line, eval_scalars, recall_table
from megatron_prolong.evaluation.session import (evaluate, read_history, read_training_loss,
                                                 write_results)
from megatron_prolong.evaluation.tasks import generate_examples
from megatron_prolong.evaluation.validation import ValidationSettings
from megatron_prolong.training.agreement import on_all_ranks
from megatron_prolong.training.checkpoint import step_dir_name


class PeriodicEvaluation:
    def __init__(self, cfg: RunConfig, data_source, metrics, rank: int) -> None:
        self.cfg, self.metrics, self.rank = cfg, metrics, rank
        self.data_cfg = getattr(data_source, "data_cfg", None)
        self.directory = os.path.join(cfg.run_dir, "eval")
        # Collective: every rank fails together, before step 1. Only `due` steps read it.
        self._prepared = on_all_ranks(self._prepare) if cfg.evaluation.interval > 0 else None

    def due(self, step: int, total: int) -> bool:
        interval = self.cfg.evaluation.interval
        return interval > 0 and (step % interval == 0 or step == total)

    def _prepare(self) -> tuple:
        from megatron_prolong.training.data_source import build_validation_samples, run_tokenizer

        e, seq = self.cfg.evaluation, self.cfg.training.seq_length
        samples = build_validation_samples(self.cfg, self.data_cfg)
        settings = ValidationSettings.for_run(self.cfg, samples)
        examples = []
        if e.recall_tasks:
            lengths = e.recall_lengths or [seq]
            try:
                examples = generate_examples(e.recall_tasks, run_tokenizer(self.cfg, self.data_cfg),
                                             lengths, e.recall_depths, e.recall_examples,
                                             e.recall_seed, e.recall_template)
            except ValueError as exc:
                where = ("evaluation.recall_lengths" if e.recall_lengths
                         else "evaluation.recall_lengths (unset: training.seq_length)")
                raise ConfigError(f"{where}={lengths}: {exc}; give longer evaluation."
                                  "recall_lengths or set evaluation.recall_tasks=[]") from None
        return samples, settings, examples

    def after_step(self, step: int, total: int, state) -> None:
        """Collective: every rank calls it after every step; it evaluates when due."""
        if not self.due(step, total):
            return
        start = time.perf_counter()
        samples, settings, examples = self._prepared
        record, recall = evaluate(state.model, state.forward_backward, step=step,
                                  samples=samples, settings=settings, examples=examples)
        text = eval_line(record) + f" | {time.perf_counter() - start:.1f} s"
        if recall and step == total:
            text += "\n" + recall_table(recall, f"recall at step {step}")
        if step == total:
            text += f"\nevaluation results and pictures: {self.directory}"
        self.metrics.log_evaluation(step, record, eval_scalars(record), text)
        if self.rank == 0:
            history = read_history(self.directory, up_to_step=step - 1) + [record]
            write_results(self.directory, step_dir_name(step), record, recall, history,
                          self.cfg.evaluation.plots, title=self.cfg.name,
                          train_loss=read_training_loss(self.cfg.run_dir))
