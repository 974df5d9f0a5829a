"""Recall examples through the model: one forward pass each, scored at the answer positions.

Each example is one packed row (one document: prompt + gold answer). Examples of the same length
go through the schedule together; data-parallel ranks take every dp-th example; CP ranks each
score the answer tokens they hold, and the sums are added (forward.sum_over_replicas).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import torch
from megatron.core import parallel_state

from megatron_prolong.evaluation.forward import forward_only, sum_over_replicas
from megatron_prolong.evaluation.scoring import AnswerScore
from megatron_prolong.evaluation.tasks import Example


def recall_batch(example: Example) -> dict:
    """prompt + answer as one document; answer_mask marks the positions predicting the answer."""
    ids = torch.tensor(example.prompt_ids + example.answer_ids, dtype=torch.int64)
    n, first = len(ids), len(example.prompt_ids) - 1
    labels = torch.zeros(n, dtype=torch.int64)
    labels[:-1] = ids[1:]
    answer_mask = torch.zeros(n, dtype=torch.float32)
    answer_mask[first:n - 1] = 1.0
    return dict(tokens=ids[None], labels=labels[None], loss_mask=torch.zeros(1, n),
                answer_mask=answer_mask[None],
                cu_seqlens=torch.tensor([0, n], dtype=torch.int32), max_seqlen=n)


def score_examples(model: list, forward_backward: Callable, examples: list[Example],
                   progress: Optional[Callable[[int, int], None]] = None) -> list[AnswerScore]:
    """Collective; every rank passes the same examples and gets every example's score."""
    dp, rank = (parallel_state.get_data_parallel_world_size(),
                parallel_state.get_data_parallel_rank())
    # Micro-batches per schedule call: enough to keep every pipeline stage busy.
    per_call = max(1, parallel_state.get_pipeline_model_parallel_world_size())
    by_length = defaultdict(list)
    for i, ex in enumerate(examples):
        by_length[ex.length].append(i)
    local = torch.zeros(len(examples), 3, dtype=torch.float64)
    done = 0
    for length in sorted(by_length):
        indices = by_length[length]
        for start in range(0, len(indices), per_call * dp):
            round_ = indices[start:start + per_call * dp]
            mine = round_[rank::dp]
            reports = forward_only(model, forward_backward, [recall_batch(examples[i]) for i in mine])
            for i, report in zip(mine, reports):
                local[i] += report["answer"].cpu()
            done += len(round_)
            if progress is not None:
                progress(done, len(examples))
    device = next(model[0].parameters()).device
    totals = sum_over_replicas(local, device).cpu().tolist()
    return [AnswerScore(s, int(n), int(c)) for s, n, c in totals]


@dataclass
class RecallRecord:
    task: str
    length: int
    depth: float
    index: int
    template: str
    placed_depth: float
    answer_tokens: int
    exact_match: bool
    token_accuracy: float
    mean_logprob: float


def recall_records(examples: list[Example], scores: list[AnswerScore]) -> list[RecallRecord]:
    return [RecallRecord(ex.task, ex.length, ex.depth, ex.index, ex.template,
                         round(ex.placed_depth, 4), s.tokens, s.exact_match,
                         s.token_accuracy, s.mean_logprob)
            for ex, s in zip(examples, scores)]


def summarize(records: list[RecallRecord]) -> dict:
    """Means per task x length x depth ('cells'), per task and overall."""
    def means(rs):
        return {"exact_match": float(np.mean([r.exact_match for r in rs])),
                "token_accuracy": float(np.mean([r.token_accuracy for r in rs])),
                "mean_logprob": float(np.mean([r.mean_logprob for r in rs])),
                "examples": len(rs)}

    cells = defaultdict(list)
    tasks = defaultdict(list)
    for r in records:
        cells[(r.task, r.length, r.depth)].append(r)
        tasks[r.task].append(r)
    return {"overall": means(records) if records else {},
            "tasks": {t: means(rs) for t, rs in tasks.items()},
            "cells": [{"task": t, "length": n, "depth": d, **means(rs)}
                      for (t, n, d), rs in sorted(cells.items())],
            "examples": [asdict(r) for r in records]}
