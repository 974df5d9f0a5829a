"""tools/evaluate.py evaluates a checkpoint at the layout of the processes it runs in: a run
trained and saved at TP=2 (two gloo processes) evaluates in one process, with the per-example
scores of an evaluation at the saved layout (within fp32 tolerance)."""
import json
import os

import pytest

from distributed import run_distributed

RECALL = ["--tasks", "json_kv", "--lengths", "512", "--depths", "0.0", "0.5", "1.0",
          "--examples", "1", "--no-plots"]


def train_then_evaluate_at_saved_layout(root):
    from tool_modules import load_tool
    from training_cases import _runtime, run

    run_dir = os.path.join(root, "run")
    _runtime()
    run([f"run_dir={run_dir}", "parallel.tensor=2", "training.train_steps=2"])
    code = load_tool("evaluate").main(["--checkpoint", run_dir, "--saved-layout",
                                       "--out", os.path.join(root, "saved"), *RECALL])
    return code


def evaluate_in_one_process(root):
    from tool_modules import load_tool

    return load_tool("evaluate").main(["--checkpoint", os.path.join(root, "run"),
                                       "--out", os.path.join(root, "one"), *RECALL])


@pytest.mark.slow
def test_a_tp2_checkpoint_evaluates_in_one_process_with_the_same_scores(tmp_path):
    assert run_distributed(train_then_evaluate_at_saved_layout, 2, str(tmp_path)) == [0, 0]
    assert run_distributed(evaluate_in_one_process, 1, str(tmp_path)) == [0]
    saved = json.load(open(tmp_path / "saved" / "results.json"))["examples"]
    one = json.load(open(tmp_path / "one" / "results.json"))["examples"]
    assert len(saved) == len(one) == 3
    for a, b in zip(saved, one):
        assert abs(a["mean_logprob"] - b["mean_logprob"]) <= 1e-5, (a, b)
        assert a["token_accuracy"] == b["token_accuracy"] and a["exact_match"] == b["exact_match"]
