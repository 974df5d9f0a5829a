"""The closing summary of a training launch says what its numbers are: the first and last loss
are single steps of this launch (a log line shows its interval's mean, named beside it), where
the launch started (resumed at step N from a checkpoint), and each domain's realised share of
the loss tokens this launch consumed beside the mixture's target share."""
import contextlib
import io
import os
import re

import pytest

from distributed import run_distributed
from test_eval_parallel import write_mixture


def two_launches(root, mixture):
    from training_cases import BASE, _runtime, run

    from megatron_prolong.config import load_config, validate
    from megatron_prolong.training.data_source import build_data_source

    _runtime()
    common = [f"run_dir={os.path.join(root, 'run')}", "data.kind=mixture",
              f"data.mixture={mixture}", "training.train_steps=6", "logging.log_interval=3",
              "training.global_batch_size=4"]
    run(common + ["training.exit_at_step=3"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        second = run(common)
    # Independently: the loss tokens of the rows steps 4-6 consumed (global samples 12-23).
    cfg = load_config(None, BASE + common)
    dataset = build_data_source(cfg, validate(cfg, 1), 0, rank=0).dataset
    counts = {}
    for i in range(12, 24):
        sample = dataset[i]
        counts[sample.domain] = counts.get(sample.domain, 0) + int(sample.loss_mask.sum())
    return printed.getvalue(), second.losses, counts


@pytest.mark.slow
def test_closing_summary_names_its_steps_origin_and_domain_shares(tmp_path):
    ((text, losses, counts),) = run_distributed(two_launches, 1, str(tmp_path),
                                               write_mixture(tmp_path))
    assert sorted(losses) == [4, 5, 6]
    mean = sum(losses.values()) / 3
    log_line = next(line for line in text.splitlines() if line.startswith("step 6/6"))
    assert f"loss {mean:.4f}" in log_line
    summary = text[text.index("finished "):]
    assert (f"loss {losses[4]:.4f} (step 4, the first of this launch) -> {losses[6]:.4f} "
            f"(step 6), single steps; the step-6 log line shows {mean:.4f}, the mean of "
            "steps 4-6") in summary
    assert re.search(r"this launch: steps 4-6, resumed at step 3 from \S+step_00000003", summary)
    total = sum(counts.values())
    shares = dict(re.findall(r"(books|web) (\d+\.\d)% \(target", summary))
    assert shares == {d: f"{100 * counts[d] / total:.1f}" for d in ("books", "web")}
    assert "books" in summary and "(target 60.0%)" in summary and "(target 40.0%)" in summary
    assert f"this launch ({total:,})" in summary
