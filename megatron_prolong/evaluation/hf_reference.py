"""The independent reference: the same recall examples and validation rows scored by Hugging Face
transformers' own Llama (`AutoModelForCausalLM`), one process, no megatron code on the path.

Recall: one forward per example over prompt + answer; logits only at the answer positions (final
hidden states through `lm_head`), so long examples do not materialise [T, V] logits. Validation:
each document segment of a packed row runs on its own (what document masking computes), its
per-token losses go into the same domain and position sums as megatron's (forward.validation_sums).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron_prolong.evaluation.forward import validation_sums
from megatron_prolong.evaluation.scoring import AnswerScore, answer_token_scores
from megatron_prolong.evaluation.tasks import Example
from megatron_prolong.evaluation.validation import (ValidationResult, ValidationSettings,
                                                    validation_batch)


def load_hf_model(directory: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A local directory only: the hub client is never asked (a mistyped path would otherwise
    be tried as a repository name, with network retries, before failing)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=dtype,
                                                 local_files_only=True)
    return model.to(device).eval()


def _hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """Final (normalised) hidden states [T, h] of one sequence."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return model.model(input_ids=ids[None].to(device)).last_hidden_state[0]


def hf_score_examples(model, examples: list[Example],
                      progress: Optional[Callable[[int, int], None]] = None) -> list[AnswerScore]:
    out = []
    for k, ex in enumerate(examples):
        ids = torch.tensor(ex.prompt_ids + ex.answer_ids)
        first = len(ex.prompt_ids) - 1
        hidden = _hidden(model, ids)[first:len(ids) - 1]
        targets = torch.tensor(ex.answer_ids, device=hidden.device)
        with torch.no_grad():
            logprob, correct = answer_token_scores(hidden, model.lm_head.weight, targets)
        out.append(AnswerScore(float(logprob.double().sum()), len(targets), int(correct.sum())))
        if progress is not None:
            progress(k + 1, len(examples))
    return out


def hf_validation(model, samples, settings: ValidationSettings,
                  chunk: int = 4096) -> ValidationResult:
    sums = torch.zeros(2, settings.columns, dtype=torch.float64)
    for sample in samples:
        batch = validation_batch(sample, settings)
        loss = torch.zeros(sample.seq_length, dtype=torch.float32)
        bounds = sample.cu_seqlens.tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):
            hidden = _hidden(model, torch.as_tensor(sample.tokens[a:b]))
            labels = torch.as_tensor(sample.labels[a:b]).to(hidden.device)
            for s in range(0, b - a, chunk):  # logits a chunk of tokens at a time
                with torch.no_grad():
                    logits = model.lm_head(hidden[s:s + chunk]).float()
                    loss[a + s:a + s + len(logits)] = torch.nn.functional.cross_entropy(
                        logits, labels[s:s + chunk], reduction="none").cpu()
        sums += validation_sums(batch, loss[None])
    return ValidationResult.from_sums(sums, settings)
