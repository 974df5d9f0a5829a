"""One-pass answer scoring against full logits, and the validation bookkeeping (buckets by
position in the document, domains) against a direct computation."""
import numpy as np
import torch

from megatron_prolong.data.packing import build_sample
from megatron_prolong.evaluation.forward import validation_sums
from megatron_prolong.evaluation.recall import recall_batch
from megatron_prolong.evaluation.scoring import answer_token_scores
from megatron_prolong.evaluation.tasks import Example
from megatron_prolong.evaluation.validation import (ValidationResult, ValidationSettings,
                                                    bucket_labels, default_buckets,
                                                    validation_batch)


def test_scores_equal_full_logits_and_ties_go_to_the_lowest_id():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(9, 16, generator=g), torch.randn(40, 16, generator=g)
    weight[7] = weight[3]  # tokens 3 and 7 always tie
    hidden[4] = hidden[5] = 10 * weight[3]  # ... and are the maximum at positions 4 and 5
    targets = torch.randint(0, 40, (9,), generator=g)
    logits = hidden @ weight.t()
    targets[:3] = logits[:3].argmax(dim=1)  # positions where the gold is the argmax
    targets[4], targets[5] = 7, 3
    logprob, correct = answer_token_scores(hidden, weight, targets)
    want = torch.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
    assert torch.allclose(logprob, want, atol=1e-5)
    assert torch.equal(correct, logits.argmax(dim=1) == targets)
    assert correct[:3].all() and not correct[4] and correct[5]  # greedy picks 3 over 7


def test_recall_batch_marks_the_positions_that_predict_the_answer():
    ex = Example("json_kv", 8, 0.5, 0, "plain", [5, 6, 7, 8, 9], [10, 11, 12], " x", "k",
                 1, 2, 0, 5)
    b = recall_batch(ex)
    positions = torch.nonzero(b["answer_mask"][0]).squeeze(1).tolist()
    assert positions == [4, 5, 6]
    assert b["labels"][0, positions].tolist() == [10, 11, 12]
    assert b["cu_seqlens"].tolist() == [0, 8]


def test_position_buckets_and_domain_sums_add_up():
    assert default_buckets(65536) == [1024, 4096, 16384]
    assert default_buckets(524288) == [1024, 4096, 16384, 65536, 262144]
    assert bucket_labels([1024, 4096], 8192) == ["0-1K", "1K-4K", "4K-8K"]
    rng = np.random.default_rng(0)
    settings = ValidationSettings(64, ["a", "b"], [8, 32])  # long documents: >= 32 tokens
    samples = [build_sample([rng.integers(0, 100, n) for n in lens], 64, d, pad_id=0)
               for lens, d in (([40, 24], "a"), ([64], "b"), ([10, 50], "a"))]
    sums = torch.zeros(2, 2 + 2 + 2, dtype=torch.float64)
    direct = {"all": [], "long": {}, "domain": {}}
    for sample in samples:
        batch = validation_batch(sample, settings)
        loss = torch.rand(64, dtype=torch.float64)
        sums += validation_sums(batch, loss[None])
        mask = sample.loss_mask.astype(bool)
        for start, end in zip(sample.cu_seqlens[:-1], sample.cu_seqlens[1:]):
            for p in range(start, end):
                if not mask[p]:
                    continue
                direct["all"].append(float(loss[p]))
                direct["domain"].setdefault(sample.domain, []).append(float(loss[p]))
                if end - start >= 32:
                    label = bucket_labels([8, 32], 64)[np.searchsorted([8, 32], p - start, "right")]
                    direct["long"].setdefault(label, []).append(float(loss[p]))
    result = ValidationResult.from_sums(sums, settings)
    assert abs(result.loss - np.mean(direct["all"])) < 1e-12
    assert result.tokens == len(direct["all"])
    for name, values in direct["domain"].items():
        assert abs(result.domain_loss[name] - np.mean(values)) < 1e-12
    for label, values in direct["long"].items():
        assert abs(result.position_loss[label] - np.mean(values)) < 1e-12
        assert result.position_tokens[label] == len(values)
    long_values = [v for vs in direct["long"].values() for v in vs]
    assert result.long_tokens == len(long_values) == sum(result.position_tokens.values())
    assert abs(result.long_loss - np.mean(long_values)) < 1e-12
    assert sum(result.domain_tokens.values()) == result.tokens
