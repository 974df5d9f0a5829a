"""Recomputation: every setting the planner may choose gives the losses and gradients of no
recomputation (megatron-core's local spec on CPU), and the planner (training/dry_run.py) picks
the least recomputation that fits."""
import dataclasses

import pytest
import torch

from megatron_prolong.config import load_config
from megatron_prolong.model.context_parallel import packed_seq_params
from megatron_prolong.model.llama import build_llama

SETTINGS = {
    "selective-core_attn": ["model.recompute=selective", "model.recompute_modules=core_attn"],
    "selective-mlp": ["model.recompute=selective", "model.recompute_modules=mlp"],
    "selective-core_attn-mlp": ["model.recompute=selective",
                                "model.recompute_modules=core_attn,mlp"],
    "full-block-1": ["model.recompute=full", "model.recompute_method=block",
                     "model.recompute_num_layers=1"],
    "full-uniform": ["model.recompute=full", "model.recompute_num_layers=1"],
}


def _loss_and_grads(overrides):
    cfg = load_config(None, ["model.preset=tiny", "model.num_layers=2", *overrides])
    torch.manual_seed(0)
    model = build_llama(cfg.model, cfg.parallel, on_cpu=True, use_te=False).train()
    g = torch.Generator().manual_seed(1)
    lengths = [40, 1, 23]
    t = sum(lengths)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, t), generator=g)
    labels = torch.randint(0, cfg.model.vocab_size, (1, t), generator=g)
    cu = torch.tensor([0, 40, 41, 64], dtype=torch.int32)
    batch = {"cu_seqlens": cu, "max_seqlen": 40}
    losses = model(tokens, torch.arange(t)[None], None, labels=labels,
                   packed_seq_params=packed_seq_params(batch, tokens.device))
    losses.sum().backward()
    return losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_recompute_gives_the_same_loss_and_gradients(megatron_single_process, name):
    base_loss, base_grads = _loss_and_grads([])
    loss, grads = _loss_and_grads(SETTINGS[name])
    torch.testing.assert_close(loss, base_loss, rtol=0, atol=1e-6)
    assert grads.keys() == base_grads.keys()
    for key in grads:
        torch.testing.assert_close(grads[key], base_grads[key], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{key}: {m}")


# --- the planner ------------------------------------------------------------------------------
from megatron_prolong.config import ConfigError, validate  # noqa: E402
from megatron_prolong.training.dry_run import (GIB, PLAN_HEADROOM, RecomputePlan,  # noqa: E402
                                               dry_run_report, estimate_memory, plan_recompute)

BENCH = "examples/bench_64k_1gpu.yaml"


def _capacity(total_bytes: float, slack_gib: float = 0.01) -> float:
    """The GPU size (GiB) at which a setting needing `total_bytes` just fits the plan."""
    return total_bytes / GIB / PLAN_HEADROOM + slack_gib


def test_planner_recomputes_more_as_memory_shrinks():
    cfg = load_config(BENCH, ["model.recompute=auto"])
    layout = validate(cfg, 1)
    est = estimate_memory(cfg, layout)
    roomy = plan_recompute(cfg, layout, _capacity(est.total("none")))
    assert roomy.plan == RecomputePlan() and roomy.fits and roomy.extra_flops == 0
    mlp = RecomputePlan("selective", ("mlp",))
    just_mlp = plan_recompute(cfg, layout, _capacity(est.total(mlp)))
    assert just_mlp.plan == mlp and 0 < just_mlp.extra_flops
    # The fewest layers that block recomputation needs to keep less than selective mlp.
    block = next(p for p in (RecomputePlan("full", (), "block", n) for n in range(1, 8))
                 if est.total(p) < est.total(mlp))
    at_block = plan_recompute(cfg, layout, _capacity(est.total(block)))
    assert at_block.plan == block
    assert at_block.extra_flops > just_mlp.extra_flops
    # The least memory of all: block recomputation of all layers but the last (which is
    # released before the first recomputed layer is rebuilt) keeps one layer input less than
    # recomputing every layer.
    least = min(est.total(RecomputePlan("full", (), "block", n)) for n in range(1, 8))
    assert least < est.total("full")
    tightest = plan_recompute(cfg, layout, _capacity(least))
    assert tightest.plan == RecomputePlan("full", (), "block", 7) and tightest.fits
    nothing = plan_recompute(cfg, layout, _capacity(least, -0.01))
    assert not nothing.fits and nothing.plan == tightest.plan
    # Each step down in memory costs more recomputation.
    costs = [p.extra_flops for p in (roomy, just_mlp, at_block, tightest)]
    assert costs == sorted(costs) and len(set(costs)) == 4


def test_planner_offers_layernorm_only_on_transformer_engine():
    cfg = load_config(BENCH, ["model.recompute=auto"])
    layout = validate(cfg, 1)
    est = estimate_memory(cfg, layout)
    norms = RecomputePlan("selective", ("layernorm",))
    capacity = _capacity(est.total(norms))
    assert plan_recompute(cfg, layout, capacity, transformer_engine=True).plan == norms
    assert "layernorm" not in plan_recompute(cfg, layout, capacity).plan.modules
    with pytest.raises(ConfigError, match="layernorm"):
        validate(load_config(None, ["model.attention_backend=local", "model.recompute=selective",
                                    "model.recompute_modules=layernorm"]), 1)


def test_dry_run_prints_the_choice_and_explicit_choices_still_work():
    report, fits = dry_run_report(load_config(BENCH, ["model.recompute=auto"]), 1, 1, "h200")
    assert fits and "recompute      auto -> none (planned within 97% of the GPU)" in report
    report, fits = dry_run_report(load_config(BENCH, ["model.recompute=auto"]), 1, 1, "h100")
    assert fits and "auto -> full (first" in report and "TFLOP per step" in report
    report, _ = dry_run_report(load_config(BENCH, ["model.recompute=selective",
                                                   "model.recompute_modules=mlp"]), 1, 1, "h200")
    assert "total, recompute selective (mlp)" in report and "auto ->" not in report


def test_auto_that_fits_nothing_exits_4():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "megatron_prolong.train", BENCH, "--dry-run",
                          "--nodes", "1", "--gpus-per-node", "1", "model.recompute=auto",
                          "model.num_layers=24"], capture_output=True, text=True)
    assert run.returncode == 4, run.stderr
    assert "nothing fits" in run.stdout and "fits on H100 (79.6 GiB): NO" in run.stdout


def test_planned_model_config_reaches_megatron(megatron_single_process):
    cfg = load_config(None, ["model.preset=tiny", "model.num_layers=2"])
    plan = RecomputePlan("full", (), "block", 1)
    model = build_llama(plan.apply(cfg.model), cfg.parallel, on_cpu=True, use_te=False)
    c = model.config
    assert (c.recompute_granularity, c.recompute_method, c.recompute_num_layers) == (
        "full", "block", 1)
    mlp = RecomputePlan("selective", ("mlp",)).apply(cfg.model)
    c = build_llama(mlp, cfg.parallel, on_cpu=True, use_te=False).config
    assert c.recompute_granularity == "selective" and c.recompute_modules == ["mlp"]
    fused = load_config(None, ["model.preset=tiny", "model.num_layers=2", "model.fused_loss=true"])
    assert build_llama(fused.model, fused.parallel, on_cpu=True, use_te=False).fused_loss
    assert not model.fused_loss


def test_training_resolves_auto_against_the_gpus_memory(monkeypatch, capsys):
    from types import SimpleNamespace

    from megatron_prolong.training.parallel import Runtime
    from megatron_prolong.training.step import resolved_model_config

    cfg = load_config(BENCH, ["model.recompute=auto"])
    cpu = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), on_cpu=True)
    assert resolved_model_config(cfg, cpu, use_te=False).recompute == "none"
    gpu = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), on_cpu=False)
    for gib, expected in ((141, RecomputePlan()), (80, None)):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device, gib=gib: SimpleNamespace(total_memory=gib * GIB))
        model = resolved_model_config(cfg, gpu, use_te=False)
        plan = RecomputePlan.of(model)
        assert plan == (expected or plan_recompute(cfg, validate(cfg, 1), gib).plan)
        assert f"recompute auto -> {plan.label(8)}" in capsys.readouterr().out
    assert plan.recompute == "full" and plan.method == "block"  # 80 GiB: some layers kept
    explicit = load_config(BENCH)
    assert resolved_model_config(explicit, gpu, use_te=False) is explicit.model
