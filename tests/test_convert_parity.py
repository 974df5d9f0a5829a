"""HF <-> megatron-core conversion, end to end: logits parity at TP=1, TP=2 and PP=2, a bit-exact
round trip, and a checkpoint from a short training run exported back to transformers.

One 4-process CPU run does all the megatron-side work (spawning costs ~8 s of imports)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERT = os.path.join(ROOT, "tools", "convert.py")
SEQ = 32
INFERENCE_LAYOUTS = [(1, 1), (2, 1), (1, 2)]
TRAIN_LAYOUT = (2, 2)


def tiny_hf_model(directory: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, rope_theta=8e6,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # HF initialises norms to 1; random norms test their mapping too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(directory, max_shard_size="200KB")  # several shards + index
    return model


def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def hf_rope_theta(config) -> float:
    """The RoPE base as the installed transformers exposes it: rope_parameters in 5, the
    rope_theta attribute in 4 (where a rope_parameters key would be an ignored extra)."""
    if transformers_major() >= 5:
        return config.rope_parameters["rope_theta"]
    return config.rope_theta


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


def convert(*args: str) -> None:
    proc = subprocess.run([sys.executable, CONVERT, *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def read_hf_tensors(directory: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    out = {}
    for name, file in weight_map.items():
        with safe_open(os.path.join(directory, file), framework="pt") as handle:
            out[name] = handle.get_tensor(name)
    return out


def tiny_tokenizer(directory: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t1", eos_token="t2").save_pretrained(directory)


# ---------------------------------------------------------------------------------------------
# Megatron side (runs on every rank of the spawned job)
# ---------------------------------------------------------------------------------------------
def _logits_step(data_iterator, model):
    from megatron_prolong.model.context_parallel import packed_seq_params

    batch = next(data_iterator)
    tokens = batch["tokens"]
    positions = torch.arange(tokens.shape[1]).unsqueeze(0)
    out = model(tokens, positions, None, packed_seq_params=packed_seq_params(batch, tokens.device),
                runtime_gather_output=True)  # full vocabulary on every TP rank

    def keep_logits(output):
        return torch.zeros(()), {"logits": output.detach().float()}

    return out, keep_logits


def megatron_logits(model_chunks, tokens: torch.Tensor):
    """Forward-only through the pipeline schedule; the logits [1, s, V] on the last stage, else None."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch = dict(tokens=tokens, cu_seqlens=torch.tensor([0, tokens.shape[1]], dtype=torch.int32),
                 max_seqlen=tokens.shape[1])
    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=_logits_step, data_iterator=iter([batch]), model=model_chunks,
            num_microbatches=1, seq_length=tokens.shape[1], micro_batch_size=1, forward_only=True)
    return out[0]["logits"] if parallel_state.is_pipeline_last_stage() else None


def megatron_side(mcore_dir: str, tokens: torch.Tensor, train_run_dir: str):
    from megatron_prolong.config import load_config, save_config, validate
    from megatron_prolong.training.parallel import destroy_model_parallel, init_distributed, init_model_parallel
    from megatron_prolong.training.step import build_model_chunks, setup_training, train_step
    from megatron_prolong.training.weights import load_model_weights, save_model_weights
    from parallel_cases import synthetic_packed_rows

    rt = init_distributed("cpu")
    recipe = os.path.join(mcore_dir, "model.yaml")  # the converter's model config is a recipe
    base = ["training.precision=fp32", "training.device=cpu", f"training.seq_length={SEQ}"]
    results = {}
    for tp, pp in INFERENCE_LAYOUTS:
        cfg = load_config(recipe, base + [f"parallel.tensor={tp}", f"parallel.pipeline={pp}",
                                          "training.global_batch_size=4"])
        init_model_parallel(validate(cfg, rt.world_size), cfg.training.seed)
        chunks = build_model_chunks(cfg, rt, wrap_ddp=False)
        load_model_weights(chunks, mcore_dir)
        results[(tp, pp)] = megatron_logits(chunks, tokens)
        destroy_model_parallel()

    tp, pp = TRAIN_LAYOUT
    cfg = load_config(recipe, base + [f"parallel.tensor={tp}", f"parallel.pipeline={pp}",
                                      "training.global_batch_size=2", "optimizer.lr=1e-2"])
    layout = validate(cfg, rt.world_size)
    init_model_parallel(layout, cfg.training.seed)
    state = setup_training(cfg, rt, layout)
    load_model_weights(state.model, mcore_dir)
    rows = synthetic_packed_rows(cfg.training.global_batch_size, SEQ, cfg.model.vocab_size, seed=7)
    losses = [train_step(state, rows).loss for _ in range(2)]
    save_model_weights(state.model, os.path.join(train_run_dir, "weights"))
    if rt.rank == 0:
        save_config(cfg, os.path.join(train_run_dir, "config.yaml"))  # as a training run does
    results["trained"] = megatron_logits(state.model, tokens)
    results["losses"] = losses
    destroy_model_parallel()
    return results


@pytest.mark.slow
def test_hf_megatron_hf_parity_round_trip_and_trained_export(tmp_path):
    hf_dir, mcore_dir = str(tmp_path / "hf"), str(tmp_path / "mcore")
    back_dir, run_dir, export_dir = str(tmp_path / "hf_back"), str(tmp_path / "run"), str(tmp_path / "export")
    tok_dir = str(tmp_path / "tok")
    model = tiny_hf_model(hf_dir)
    tiny_tokenizer(tok_dir)
    tokens = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(3))
    reference = hf_logits(model, tokens)

    convert("hf-to-mcore", "--hf-dir", hf_dir, "--out", mcore_dir, "--target-tp", "2", "--target-pp", "2")
    results = run_distributed(megatron_side, 4, mcore_dir, tokens, run_dir)

    # Logits parity at every layout, on every rank that holds them.
    for (tp, pp) in INFERENCE_LAYOUTS:
        got = [r[(tp, pp)] for r in results if r[(tp, pp)] is not None]
        assert len(got) == 4 // pp, (tp, pp)
        for logits in got:
            assert logits.shape == reference.shape
            diff = (logits - reference).abs().max().item()
            assert diff <= 1e-4, f"TP={tp} PP={pp}: max abs logit difference {diff}"

    # HF -> megatron -> HF: every tensor bit for bit, and an equivalent config.
    convert("mcore-to-hf", "--checkpoint", mcore_dir, "--out", back_dir, "--max-shard-size", "150KB")
    original, back = read_hf_tensors(hf_dir), read_hf_tensors(back_dir)
    assert sorted(original) == sorted(back)
    for name in original:
        assert original[name].dtype == back[name].dtype and torch.equal(original[name], back[name]), name
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    def comparable(path):
        d = LlamaConfig.from_pretrained(path).to_dict()
        for key in ("transformers_version", "_name_or_path", "torch_dtype", "dtype"):
            d.pop(key, None)
        return d

    assert comparable(hf_dir) == comparable(back_dir)
    assert len(json.load(open(os.path.join(back_dir, "model.safetensors.index.json")))["weight_map"]) == len(original)

    # A short training run (TP=2 x PP=2) exported to HF: transformers reproduces its logits.
    losses = results[0]["losses"]
    assert losses[1] < losses[0], f"training did not move: {losses}"
    trained = next(r["trained"] for r in results if r["trained"] is not None)
    assert (trained - reference).abs().max().item() > 1e-3, "the weights should have changed"
    convert("mcore-to-hf", "--checkpoint", os.path.join(run_dir, "weights"), "--out", export_dir,
            "--tokenizer-dir", tok_dir, "--hf-config", os.path.join(hf_dir, "config.json"))
    exported = LlamaForCausalLM.from_pretrained(export_dir, torch_dtype=torch.float32).eval()
    assert hf_rope_theta(exported.config) == 8e6 and exported.config.max_position_embeddings == 4096
    diff = (hf_logits(exported, tokens) - trained).abs().max().item()
    assert diff <= 1e-4, f"exported model's logits differ from megatron's by {diff}"
    tok = AutoTokenizer.from_pretrained(export_dir)
    assert tok.convert_tokens_to_ids("t5") == 5
    assert json.load(open(os.path.join(export_dir, "generation_config.json")))["eos_token_id"] == 2
