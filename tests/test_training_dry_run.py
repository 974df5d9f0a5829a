"""The dry run: layout, budget and memory for each recipe; the CLI's exit codes."""
import subprocess
import sys

import pytest

from megatron_prolong.config import ConfigError, load_config
from megatron_prolong.training.dry_run import GIB, dry_run_report, estimate_memory, parameter_counts
from megatron_prolong.config import validate

RECIPES = {"examples/stage1_64k.yaml": ("TP=2 PP=1 CP=1 DP=32", "4,769 steps"),
           "examples/stage2_512k.yaml": ("TP=2 PP=1 CP=4 DP=8", "2,385 steps"),
           "examples/sft.yaml": ("TP=2 PP=1 CP=1 DP=32", "239 steps")}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_each_recipe_fits_8_nodes_of_h100(recipe):
    report, fits = dry_run_report(load_config(recipe), 8, 8, "h100")
    layout, steps = RECIPES[recipe]
    assert fits and "fits on H100 (79.6 GiB): yes" in report
    assert layout in report and steps in report


def test_llama3_8b_parameter_count():
    layer, embed, output = parameter_counts(load_config("examples/stage1_64k.yaml"))
    assert 32 * layer + embed + output == pytest.approx(8.03e9, rel=1e-3)


def test_memory_estimate_tracks_the_layout():
    cfg = load_config("examples/stage1_64k.yaml")
    tp2 = estimate_memory(cfg, validate(cfg, 64))
    cfg4 = load_config("examples/stage1_64k.yaml", ["parallel.tensor=4"])
    tp4 = estimate_memory(cfg4, validate(cfg4, 64))
    assert tp4.params == pytest.approx(tp2.params / 2, rel=0.01)
    assert tp2.activations_full < tp2.activations_selective < tp2.activations_none
    # bf16 weights of half of 8.03B parameters
    assert tp2.params / GIB == pytest.approx(8.03e9 / 2 * 2 / GIB, rel=0.01)
    unchunked = load_config("examples/stage1_64k.yaml", ["training.loss_chunk_size=0"])
    assert estimate_memory(unchunked, validate(unchunked, 64)).loss > 5 * tp2.loss


def test_layout_errors_name_the_field():
    with pytest.raises(ConfigError, match="world size 12"):
        dry_run_report(load_config("examples/stage1_64k.yaml", ["parallel.tensor=8"]), 3, 4, "h100")


def test_cli_exit_codes():
    cmd = [sys.executable, "-m", "megatron_prolong.train", "examples/stage2_512k.yaml",
           "--dry-run", "--nodes", "8", "--gpu", "h100"]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0 and "TP=2 PP=1 CP=4 DP=8" in ok.stdout
    too_big = subprocess.run(cmd + ["model.recompute=none"], capture_output=True, text=True)
    assert too_big.returncode == 4 and "fits on H100 (79.6 GiB): NO" in too_big.stdout
    bad = subprocess.run(cmd + ["parallel.tensor=3"], capture_output=True, text=True)
    assert bad.returncode == 2 and "parallel.tensor=3" in bad.stderr


def test_single_gpu_benchmark_recipe_fits_one_h100():
    report, fits = dry_run_report(load_config("examples/bench_64k_1gpu.yaml"), 1, 1, "h100")
    assert fits, report
    assert "TP=1 PP=1 CP=1 DP=1" in report and "2.80B parameters" in report
