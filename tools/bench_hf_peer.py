"""The peer: the same packed rows through Hugging Face transformers' LlamaForCausalLM, the stack
ProLong trained with, timed the way tools/bench_train.py times ours.

    python tools/bench_hf_peer.py                           # examples/bench_64k_1gpu.yaml, CUDA
    python tools/bench_hf_peer.py --attention flex --json results/hf-peer.json
    python tools/bench_hf_peer.py --profile                 # + torch.profiler's top costs
    python tools/bench_hf_peer.py --tiny                    # CPU smoke run in seconds (CI runs it)

Same model and work as ours: the recipe's widths, layers, vocabulary and RoPE base
(convert/hf_config.py writes the HF config), the recipe's synthetic packed rows in the same order
(training/data_source.py), one optimizer step per global batch with gradient accumulation over
its micro-batches, AdamW with the recipe's settings and gradient clipping. As ProLong ran it:
fp32 master weights under bf16 autocast (HF Trainer's bf16=True; `--param-dtype bf16` keeps
bf16 weights instead), gradient checkpointing of every layer, positions restarting at every
document, and the LM head + cross-entropy in chunks of `training.loss_chunk_size` tokens, each
chunk recomputed in the backward (torch.utils.checkpoint), so the 128K-vocabulary logits of a
64K row never exist at once.

Document-masked attention, fastest first (`--attention auto` takes the first available):
- flash: attn_implementation=flash_attention_2 with position_ids restarting per document:
  transformers turns them into flash-attn's varlen cu_seqlens (ProLong's own setting).
- flex: attn_implementation=flex_attention with the document BlockMask handed over as the
  attention mask (the mask of model/attention.py, so both stacks skip the same tiles);
  transformers compiles flex_attention itself. Needs CUDA and transformers >= 4.48.
- sdpa: attn_implementation=sdpa with a dense [T, T] boolean document mask: exact everywhere,
  but O(T^2) memory, so refused above 16K tokens per row (CPU smoke runs, old transformers).
Works with transformers 4.45+ and 5.x. Exit status: 0 measured, 2 configuration error.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from contextlib import nullcontext
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from bench_common import (StepProfiler, benchmark_parser, check_step_budget,  # noqa: E402
                          parse_benchmark_args, peak_memory_gib, report, result_row, step_work,
                          timed_steps)

ATTENTION = ("auto", "flash", "flex", "sdpa")
HF_IMPLEMENTATION = {"flash": "flash_attention_2", "flex": "flex_attention", "sdpa": "sdpa"}
DENSE_MASK_LIMIT = 16384  # tokens per row: a [T, T] mask beyond this costs GiBs


class PeerError(ValueError):
    """A peer configuration that cannot run here; the message says what to change."""


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = benchmark_parser(__doc__)
    p.add_argument("--attention", choices=ATTENTION, default="auto")
    p.add_argument("--param-dtype", choices=("fp32", "bf16"), default="fp32",
                   help="weights and optimizer's dtype under bf16 autocast (default fp32, "
                        "as HF Trainer with bf16=True)")
    return parse_benchmark_args(p, argv)


# ---------------------------------------------------------------------------------------------
# Attention choice and masks
# ---------------------------------------------------------------------------------------------
def _flex_supported() -> bool:
    from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

    try:
        from transformers.utils import is_torch_flex_attn_available
    except ImportError:
        return False
    return bool(getattr(LlamaPreTrainedModel, "_supports_flex_attn", False)
                and is_torch_flex_attn_available())


def unavailable(attention: str, device: str, row_tokens: int) -> Optional[str]:
    """Why `attention` cannot run here, or None."""
    if attention == "flash":
        if device != "cuda":
            return "flash-attn runs on CUDA only"
        if importlib.util.find_spec("flash_attn") is None:
            return "flash-attn is not installed"
    if attention == "flex":
        if device != "cuda":
            return "FlexAttention trains on CUDA only (PyTorch has no CPU backward for it)"
        if not _flex_supported():
            import transformers

            return (f"transformers {transformers.__version__} (with torch {torch.__version__}) "
                    "has no flex_attention for Llama (needs transformers >= 4.48)")
    if attention == "sdpa" and row_tokens > DENSE_MASK_LIMIT:
        return (f"a dense document mask of {row_tokens:,} x {row_tokens:,} tokens is too large "
                f"(limit {DENSE_MASK_LIMIT:,}); use flash or flex")
    return None


def choose_attention(requested: str, device: str, row_tokens: int) -> str:
    if requested != "auto":
        reason = unavailable(requested, device, row_tokens)
        if reason:
            raise PeerError(f"--attention {requested}: {reason}")
        return requested
    for name in ("flash", "flex", "sdpa"):
        if unavailable(name, device, row_tokens) is None:
            return name
    raise PeerError(f"no document-masked attention for rows of {row_tokens:,} tokens here: "
                    f"{unavailable('sdpa', device, row_tokens)}")


def document_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[1, total] positions restarting at every document (RoPE as megatron applies it to THD)."""
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lengths)
    return (torch.arange(total) - starts)[None]


def attention_mask(attention: str, cu_seqlens: torch.Tensor, total: int, device):
    """What LlamaModel takes as attention_mask for this implementation."""
    if attention == "flash":
        return None  # the restarting position_ids carry the documents
    if attention == "flex":
        from megatron_prolong.model.attention import document_block_mask

        return document_block_mask(cu_seqlens.to(device), total)
    cu = cu_seqlens.to(torch.int64)
    doc = torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1])
    pos = torch.arange(total)
    dense = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])
    return dense[None, None].to(device)


# ---------------------------------------------------------------------------------------------
# Model, loss, step
# ---------------------------------------------------------------------------------------------
def build_peer(model_cfg, attention: str, device: str, param_dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_prolong.convert.hf_config import hf_config_from_model

    hf = LlamaConfig.from_dict(hf_config_from_model(model_cfg, param_dtype))
    hf.use_cache = False
    with torch.device(device):
        model = LlamaForCausalLM._from_config(hf, attn_implementation=HF_IMPLEMENTATION[attention])
    model.to(dtype=param_dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _chunk_loss(hidden, weight, labels, mask):
    logits = F.linear(hidden, weight).float()
    return (F.cross_entropy(logits, labels, reduction="none") * mask).sum()


def chunked_lm_loss(hidden, weight, labels, mask, chunk: int) -> torch.Tensor:
    """Sum of the masked token losses, LM head + cross-entropy `chunk` tokens at a time, each
    chunk's logits recomputed in the backward (0: all tokens at once, no recomputation)."""
    if chunk <= 0:
        return _chunk_loss(hidden, weight, labels, mask)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        end = start + chunk
        total = total + checkpoint(_chunk_loss, hidden[start:end], weight, labels[start:end],
                                   mask[start:end], use_reentrant=False)
    return total


def row_hidden(model, batch: dict, attention: str, device) -> torch.Tensor:
    """Final hidden states [T, h] of one packed row."""
    tokens = batch["tokens"].to(device)
    total = tokens.shape[1]
    out = model.model(input_ids=tokens,
                      position_ids=document_positions(batch["cu_seqlens"], total).to(device),
                      attention_mask=attention_mask(attention, batch["cu_seqlens"], total, device),
                      use_cache=False)
    return out[0][0]


def train_step(model, optimizer, batches: list[dict], attention: str, device, autocast,
               chunk: int, clip: float) -> float:
    """One optimizer step over the micro-batches; returns the mean loss per loss token."""
    count = sum(float(b["loss_mask"].sum()) for b in batches)
    total = 0.0
    for batch in batches:
        with autocast():
            hidden = row_hidden(model, batch, attention, device)
            loss = chunked_lm_loss(hidden, model.lm_head.weight, batch["labels"][0].to(device),
                                   batch["loss_mask"][0].to(device), chunk)
        (loss / count).backward()
        total += float(loss.detach())
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / max(count, 1.0)


def run(ns: argparse.Namespace) -> dict:
    import transformers

    from megatron_prolong.config import Layout, load_config
    from megatron_prolong.training.data_source import build_data_source
    from megatron_prolong.training.parallel import resolve_device

    cfg = load_config(ns.recipe, ns.overrides)
    t = cfg.training
    device = resolve_device(t.device)
    total = t.total_steps()
    profile_steps = ns.profile_window
    problem = check_step_budget(total, ns)
    if problem:
        raise PeerError(problem)
    attention = choose_attention(ns.attention, device, t.micro_batch_size * t.seq_length)
    bf16 = t.precision == "bf16"
    param_dtype = torch.bfloat16 if ns.param_dtype == "bf16" else torch.float32
    print(f"[peer] transformers {transformers.__version__}, torch {torch.__version__}, "
          f"attention {attention}, {ns.param_dtype} weights"
          f"{', bf16 autocast' if bf16 else ''}, {total} steps on {device}", flush=True)
    torch.manual_seed(t.seed)
    model = build_peer(cfg.model, attention, device, param_dtype)
    o = cfg.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.adam_beta1, o.adam_beta2),
                                  eps=o.adam_eps, weight_decay=o.weight_decay,
                                  **({"fused": True} if device == "cuda" else {}))
    data = build_data_source(cfg, Layout(1, 1, 1, 1, 1, t.global_batch_size // t.micro_batch_size),
                             dp_rank=0, rank=0)

    def autocast():
        return torch.autocast(device, dtype=torch.bfloat16) if bf16 else nullcontext()

    profiler = StepProfiler(device)
    steps, losses = [], []
    for step in range(1, total + 1):
        batches = data.next_step()
        if step == total - profile_steps + 1 and profile_steps:
            profiler.start()
        start = time.perf_counter()
        loss = train_step(model, optimizer, batches, attention, device, autocast,
                          t.loss_chunk_size, o.clip_grad)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        steps.append((seconds, *step_work(cfg, batches)))
        losses.append(loss)
        print(f"[peer] step {step}/{total} loss {loss:.4f} {seconds:.3f} s", flush=True)
    if profiler.active:
        profiler.stop()
    timed = timed_steps(steps[:total - profile_steps], ns.warmup)
    row = result_row(ns.name or f"hf-peer-{attention}", cfg, device, timed,
                     peak_memory_gib(device), kind="hf-peer", attention=attention,
                     param_dtype=ns.param_dtype, transformers=transformers.__version__,
                     recipe=os.path.relpath(ns.recipe), overrides=ns.overrides, losses=losses,
                     all_step_times_s=[s for s, _, _ in steps])
    if profiler.active:
        row["profile"] = profiler.report()
    return row


def main(argv: Optional[list[str]] = None) -> int:
    ns = parse_args(argv)
    from megatron_prolong.config import ConfigError

    try:
        row = run(ns)
    except (ConfigError, PeerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report(row, ns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
