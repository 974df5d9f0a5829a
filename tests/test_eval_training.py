"""Evaluation inside the training loop: due at every interval and at the last step, logged to
metrics.jsonl and run_dir/eval, and without effect on training (identical losses)."""
import json
import os

import pytest

from distributed import run_distributed

EVAL = ["evaluation.interval=2", "evaluation.heldout_docs=1", "evaluation.validation_rows=2",
        "evaluation.recall_tasks=json_kv", "evaluation.recall_lengths=[512]",
        "evaluation.recall_depths=[0,1]", "training.train_steps=5", "logging.tensorboard=true"]


def train_with_and_without_evaluation(root):
    from megatron_prolong.training.parallel import init_distributed
    from training_cases import run

    init_distributed("cpu")
    plain = run([f"run_dir={os.path.join(root, 'plain')}", "training.train_steps=5"])
    evaluated = run([f"run_dir={os.path.join(root, 'eval')}", *EVAL])
    return plain.losses, evaluated.losses


@pytest.mark.slow
def test_evaluation_is_logged_and_leaves_training_unchanged(tmp_path):
    (plain, evaluated), = run_distributed(train_with_and_without_evaluation, 1, str(tmp_path))
    assert plain == evaluated  # bit-identical: evaluation is forward-only and restores modes
    records = [json.loads(line) for line in open(tmp_path / "eval" / "metrics.jsonl")]
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4, 5]  # every interval and the last step
    for r in evals:
        e = r["eval"]
        assert set(e["val_domain_loss"]) == {"synthetic_a", "synthetic_b"}
        assert [c["depth"] for c in e["recall"]["cells"]] == [0.0, 1.0]
    assert sorted(os.listdir(tmp_path / "eval" / "eval")) == [
        "history.png", "recall_heatmap.png", "step_00000002.json", "step_00000004.json",
        "step_00000005.json"]
