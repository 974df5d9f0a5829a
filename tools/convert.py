#!/usr/bin/env python
"""Convert Llama checkpoints between Hugging Face and megatron-core.

  hf-to-mcore   HF directory (config.json + safetensors shards/index or .bin) -> megatron-core
                distributed checkpoint that load_model_weights loads at any TP/PP/CP layout,
                plus model.yaml (the `model:` section for a training recipe).
  mcore-to-hf   megatron-core distributed checkpoint (saved at any layout, TE or local spec)
                -> HF directory: config.json, generation_config.json, sharded safetensors with
                model.safetensors.index.json, tokenizer files.

Both directions convert a few tensors at a time. config.json may state RoPE in either layout
(transformers 4 / hub: rope_theta + rope_scaling; transformers 5: rope_parameters); exports
write rope_theta at the trained base, which transformers 4 and 5 both read. Exit status 2 with
one `error:` line when the input cannot be converted (biases, tied embeddings, RoPE scaling in
either layout, RoPE settings it cannot interpret, missing or truncated shards, shape or dtype
mismatches, a target layout the model cannot be split into).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = ("fp32", "bf16", "fp16")


def _dtype(name):
    if name is None:
        return None
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    h2m = sub.add_parser(
        "hf-to-mcore", help="HF Llama directory -> megatron-core distributed checkpoint",
        description="Write a megatron-core distributed checkpoint (layout-free: training loads it "
                    "at any TP/PP/CP) and model.yaml from an HF Llama directory.")
    h2m.add_argument("--hf-dir", required=True,
                     help="HF model directory with config.json and the weights "
                          "(model.safetensors[.index.json] or pytorch_model.bin[.index.json])")
    h2m.add_argument("--out", required=True,
                     help="output directory (written as OUT.partial and renamed when complete)")
    h2m.add_argument("--rope-theta", type=float, default=None,
                     help="RoPE base to train with, overriding config.json's rope_theta "
                          "(ProLong stage 1: 8e6; stage 2: 1.28e8)")
    h2m.add_argument("--max-position-embeddings", type=int, default=None,
                     help="override config.json's max_position_embeddings (e.g. 65536 for stage 1)")
    h2m.add_argument("--dtype", choices=DTYPES, default=None,
                     help="dtype of the written checkpoint (default: the HF weights' own dtype; "
                          "required when the HF weights mix dtypes)")
    h2m.add_argument("--target-tp", type=int, default=1,
                     help="tensor-parallel size you will train with; refused if the model cannot "
                          "be split that way (the checkpoint itself loads at any layout)")
    h2m.add_argument("--target-pp", type=int, default=1,
                     help="pipeline-parallel size you will train with (checked like --target-tp)")
    h2m.add_argument("--target-cp", type=int, default=1,
                     help="context-parallel size you will train with (checked like --target-tp)")
    h2m.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

    m2h = sub.add_parser(
        "mcore-to-hf", help="megatron-core distributed checkpoint -> HF Llama directory",
        description="Write an HF LlamaForCausalLM directory from a megatron-core distributed "
                    "checkpoint saved at any TP/PP layout.")
    m2h.add_argument("--checkpoint", required=True,
                     help="a training run directory (its checkpoints/latest is used), a "
                          "checkpoints/step_N directory, or a distributed checkpoint directory "
                          "(holds metadata.json and .metadata: what save_model_weights or "
                          "hf-to-mcore wrote)")
    m2h.add_argument("--out", required=True,
                     help="output HF directory (written as OUT.partial and renamed when complete)")
    m2h.add_argument("--model-config", default=None,
                     help="YAML with a `model:` section (hf-to-mcore's model.yaml or a run's "
                          "config.yaml); default: CHECKPOINT/model.yaml, CHECKPOINT/config.yaml, "
                          "or config.yaml one or two directories up")
    m2h.add_argument("--rope-theta", type=float, default=None,
                     help="rope_theta to write (default: the model config's rotary_base, i.e. the "
                          "value the model was trained with)")
    m2h.add_argument("--max-position-embeddings", type=int, default=None,
                     help="max_position_embeddings to write (default: the model config's)")
    m2h.add_argument("--dtype", choices=DTYPES, default=None,
                     help="dtype of the HF weights (default: the checkpoint's)")
    m2h.add_argument("--tokenizer-dir", default=None,
                     help="directory to copy tokenizer files (tokenizer.json, tokenizer_config.json, "
                          "special_tokens_map.json, tokenizer.model) and generation_config.json "
                          "from, e.g. the original HF model directory")
    m2h.add_argument("--hf-config", default=None,
                     help="an HF config.json to take the fields the model config does not hold "
                          "from (token ids, ...); default: CHECKPOINT/hf_config.json (written by "
                          "hf-to-mcore), else TOKENIZER_DIR/config.json")
    m2h.add_argument("--max-shard-size", default="5GB",
                     help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")
    m2h.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_prolong.config import ConfigError
    from megatron_prolong.convert import ConversionError

    try:
        if args.command == "hf-to-mcore":
            from megatron_prolong.convert.hf_to_mcore import hf_to_mcore

            model = hf_to_mcore(args.hf_dir, args.out, rope_theta=args.rope_theta,
                                max_position_embeddings=args.max_position_embeddings,
                                dtype=_dtype(args.dtype),
                                target=(args.target_tp, args.target_pp, args.target_cp),
                                overwrite=args.overwrite)
            print(f"wrote {args.out}: {model.num_layers} layers, hidden {model.hidden_size}, "
                  f"rope base {model.rotary_base:g}; train with model config {args.out}/model.yaml "
                  f"and load the weights from {args.out}")
        else:
            from megatron_prolong.convert.mcore_to_hf import mcore_to_hf

            cfg = mcore_to_hf(args.checkpoint, args.out, model_config=args.model_config,
                              rope_theta=args.rope_theta,
                              max_position_embeddings=args.max_position_embeddings,
                              dtype=_dtype(args.dtype), tokenizer_dir=args.tokenizer_dir,
                              hf_config=args.hf_config, max_shard_size=args.max_shard_size,
                              overwrite=args.overwrite)
            print(f"wrote {args.out}: rope_theta {cfg['rope_theta']:g}, max_position_embeddings "
                  f"{cfg['max_position_embeddings']}, {cfg['torch_dtype']}")
    except (ConversionError, ConfigError) as exc:  # ConfigError: CheckpointError's base too
        print("error: " + " ".join(str(exc).split("\n")), file=sys.stderr)  # one line
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
