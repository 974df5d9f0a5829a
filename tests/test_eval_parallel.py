"""Validation and recall give the same numbers at every layout: (tp, pp, cp) in {(1,1,1),
(2,1,1), (1,2,1), (1,1,2)} on 4 CPU processes (so DP = 4 or 2), from the same weights, on
held-out rows of a mixture of indexed datasets; the position buckets add up to the total."""
import math

import numpy as np
import pytest
import yaml

from distributed import run_distributed
from test_data_helpers import write_docs

LAYOUTS = [(), ("parallel.tensor=2",), ("parallel.pipeline=2",), ("parallel.context=2",)]
SEQ = 256


def write_mixture(tmp_path) -> str:
    rng = np.random.default_rng(1)
    write_docs(str(tmp_path / "books"), [rng.integers(0, 256, n) for n in rng.integers(200, 700, 30)])
    write_docs(str(tmp_path / "web"), [rng.integers(0, 256, n) for n in rng.integers(10, 120, 60)])
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump({"domains": [
        {"name": "books", "paths": [str(tmp_path / "books")], "proportion": 0.6, "mode": "long"},
        {"name": "web", "paths": [str(tmp_path / "web")], "proportion": 0.4, "mode": "short"}]}))
    return str(path)


def evaluate_under_layouts(layouts, overrides, weights_dir):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_prolong.config import load_config, validate
    from megatron_prolong.data.tokenizer import build_tokenizer
    from megatron_prolong.evaluation.session import evaluate
    from megatron_prolong.evaluation.tasks import generate_examples
    from megatron_prolong.evaluation.validation import ValidationSettings
    from megatron_prolong.data.config import DataConfig
    from megatron_prolong.training.data_source import build_validation_samples, heldout_spec
    from megatron_prolong.training.parallel import (destroy_model_parallel, init_distributed,
                                                    init_model_parallel)
    from megatron_prolong.training.step import build_model_chunks
    from megatron_prolong.training.weights import load_model_weights, save_model_weights

    rt = init_distributed("cpu")
    examples = generate_examples(["json_kv", "niah_mk"], build_tokenizer("byte"), [1024],
                                 [0.0, 0.5, 1.0], 1, seed=2)
    results = {}
    for i, layout_overrides in enumerate(layouts):
        cfg = load_config(None, list(overrides) + list(layout_overrides))
        p = cfg.parallel
        cfg.training.global_batch_size = 4 // (p.tensor * p.pipeline * p.context)
        layout = validate(cfg, rt.world_size)
        init_model_parallel(layout, cfg.training.seed)
        chunks = build_model_chunks(cfg, rt, wrap_ddp=False)
        (save_model_weights if i == 0 else load_model_weights)(chunks, weights_dir)
        data_cfg = DataConfig(tokenizer_kind="byte", mixture=cfg.data.mixture,
                              heldout=heldout_spec(cfg))
        samples = build_validation_samples(cfg, data_cfg)
        settings = ValidationSettings(SEQ, ["books", "web"], cfg.evaluation.position_buckets)
        record, recall = evaluate(chunks, get_forward_backward_func(), step=None,
                                  samples=samples, settings=settings, examples=examples)
        results[layout_overrides] = (record["eval"], recall["examples"], len(samples))
        destroy_model_parallel()
    return results


@pytest.mark.slow
def test_validation_and_recall_equal_across_layouts(tmp_path):
    overrides = ["model.preset=tiny", f"training.seq_length={SEQ}", "training.precision=fp32",
                 "training.loss_chunk_size=100", "data.kind=mixture",
                 f"data.mixture={write_mixture(tmp_path)}", "evaluation.heldout_docs=3",
                 "evaluation.validation_rows=3", "evaluation.position_buckets=[32,128]"]
    per_rank = run_distributed(evaluate_under_layouts, 4, LAYOUTS, overrides, str(tmp_path / "w"))
    ref, ref_examples, rows = per_rank[0][()]
    assert rows >= 4 and ref["val_tokens"] > 500 and ref["val_long_tokens"] > 200
    assert set(ref["val_position_loss"]) == {"0-32", "32-128", "128-256"}
    # buckets add up to the long-document total, domains to the overall total
    assert sum(ref["val_position_tokens"].values()) == ref["val_long_tokens"]
    assert math.isclose(sum(ref["val_position_loss"][k] * n for k, n in
                            ref["val_position_tokens"].items()),
                        ref["val_long_loss"] * ref["val_long_tokens"], rel_tol=1e-12)
    assert sum(ref["val_domain_tokens"].values()) == ref["val_tokens"]
    assert math.isclose(sum(ref["val_domain_loss"][k] * n for k, n in
                            ref["val_domain_tokens"].items()),
                        ref["val_loss"] * ref["val_tokens"], rel_tol=1e-12)
    for rank, result in enumerate(per_rank):
        for layout, (got, examples, _) in result.items():
            where = (layout, rank)
            for key in ("val_tokens", "val_long_tokens", "val_domain_tokens",
                        "val_position_tokens"):
                assert got[key] == ref[key], where
            for key in ("val_loss", "val_long_loss"):
                assert math.isclose(got[key], ref[key], rel_tol=1e-5), (where, key)
            for key in ("val_domain_loss", "val_position_loss"):
                for name, value in ref[key].items():
                    assert math.isclose(got[key][name], value, rel_tol=1e-5), (where, name)
            for a, b in zip(examples, ref_examples, strict=True):
                assert abs(a["mean_logprob"] - b["mean_logprob"]) <= 1e-5, (where, a, b)
                assert (a["exact_match"], a["token_accuracy"]) == (b["exact_match"],
                                                                   b["token_accuracy"]), where
