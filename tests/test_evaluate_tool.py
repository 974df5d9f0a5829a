"""tools/evaluate.py against the independent reference: a tiny Llama built in transformers,
converted with tools/convert.py, scored by the tool on the megatron checkpoint (torchrun, TP=2)
and on the HF directory. Per-example answer log-likelihoods agree within 1e-4 (fp32) and the
one-pass exact match equals transformers' `generate` greedy exact match on every example,
including answers that greedy decoding does produce and ones it misses at the last token.
Validation (packed rows, per domain and by position) agrees with transformers run on each
document alone."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")


def tiny_llama(directory: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, rope_theta=5e5,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=256, eos_token_id=257)  # the byte tokenizer's ids
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # sharp logits: argmax margins far above fp32 rounding
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(directory)
    return model


def greedy(model, prompt_ids, n):
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def megatron_validation(mcore_dir, samples, settings):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_prolong.config import load_config, validate
    from megatron_prolong.evaluation.validation import run_validation
    from megatron_prolong.training.parallel import init_distributed, init_model_parallel
    from megatron_prolong.training.step import build_model_chunks
    from megatron_prolong.training.weights import load_model_weights

    rt = init_distributed("cpu")
    cfg = load_config(os.path.join(mcore_dir, "model.yaml"),
                      ["training.precision=fp32", "training.global_batch_size=1",
                       f"training.seq_length={settings.seq_length}"])
    init_model_parallel(validate(cfg, 1), 0)
    chunks = build_model_chunks(cfg, rt, wrap_ddp=False)
    load_model_weights(chunks, mcore_dir)
    return run_validation(chunks, get_forward_backward_func(), samples, settings)


def run(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_megatron_scores_equal_transformers_and_greedy_generation(tmp_path):
    from megatron_prolong.data.tokenizer import build_tokenizer
    from megatron_prolong.evaluation.tasks import generate_examples, save_examples

    hf_dir, mcore_dir = str(tmp_path / "hf"), str(tmp_path / "mcore")
    model = tiny_llama(hf_dir)
    # --rope-theta: transformers 5 writes rope_parameters, which the converter did not read
    # before issue 9; stated explicitly, the test holds either way.
    run([sys.executable, os.path.join(TOOLS, "convert.py"), "hf-to-mcore", "--hf-dir", hf_dir,
         "--out", mcore_dir, "--rope-theta", "5e5"])
    examples = []
    for ex in generate_examples(["json_kv", "niah_mk"], build_tokenizer("byte"), [1024],
                                [0.0, 0.5, 1.0], 1, seed=4):
        n = len(ex.answer_ids)
        produced = greedy(model, ex.prompt_ids, n)
        missed_last = produced[:-1] + [(produced[-1] + 1) % 256]
        examples += [ex, dataclasses.replace(ex, answer_ids=produced),
                     dataclasses.replace(ex, answer_ids=missed_last)]
    expected = [greedy(model, ex.prompt_ids, len(ex.answer_ids)) == ex.answer_ids
                for ex in examples]
    assert sum(expected) >= len(examples) // 3  # every greedy-produced answer counts
    path = str(tmp_path / "examples.jsonl")
    save_examples(examples, path)

    common = ["--examples-file", path, "--tokenizer", "byte", "--no-plots"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2"]
    out = run(torchrun + [os.path.join(TOOLS, "evaluate.py"), "--checkpoint", mcore_dir,
                          "--out", str(tmp_path / "m"), "parallel.tensor=2", *common])
    assert "TP=2" in out and "exact match" in out
    run([sys.executable, os.path.join(TOOLS, "evaluate.py"), "--hf", hf_dir,
         "--out", str(tmp_path / "h"), *common])
    megatron = json.load(open(tmp_path / "m" / "results.json"))["examples"]
    hf = json.load(open(tmp_path / "h" / "results.json"))["examples"]
    assert len(megatron) == len(hf) == len(examples)
    for m, h, want in zip(megatron, hf, expected):
        assert abs(m["mean_logprob"] - h["mean_logprob"]) <= 1e-4, (m, h)
        assert m["exact_match"] == h["exact_match"] == want, (m, h, want)
        assert m["token_accuracy"] == h["token_accuracy"], (m, h)

    # Validation: packed rows through megatron (document masks) = each document through HF.
    from megatron_prolong.data.packing import build_sample
    from megatron_prolong.evaluation.hf_reference import hf_validation
    from megatron_prolong.evaluation.validation import ValidationSettings

    rng = np.random.default_rng(5)
    samples = [build_sample([rng.integers(0, 256, n) for n in lens], 256, domain, pad_id=258)
               for lens, domain in (([150, 106], "a"), ([256], "b"), ([40, 200], "a"))]
    settings = ValidationSettings(256, ["a", "b"], [32, 128])
    want = hf_validation(model, samples, settings)
    (got,) = run_distributed(megatron_validation, 1, mcore_dir, samples, settings)
    assert got.tokens == want.tokens and got.position_tokens == want.position_tokens
    assert abs(got.loss - want.loss) <= 1e-5 and abs(got.long_loss - want.long_loss) <= 1e-5
    for name in want.domain_loss:
        assert abs(got.domain_loss[name] - want.domain_loss[name]) <= 1e-5, name
    for label in want.position_loss:
        assert abs(got.position_loss[label] - want.position_loss[label]) <= 1e-5, label
