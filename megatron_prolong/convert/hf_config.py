"""HF config.json <-> the project's ModelConfig, for the architectures the Llama mapping covers."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import torch

from megatron_prolong.config import ModelConfig
from megatron_prolong.convert.errors import ConversionError
from megatron_prolong.convert.rope import STALE_ROPE_KEYS, hub_layout, read_rope

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPE_NAMES.items()}[dtype]


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{path}: not found") from None
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path}: not valid JSON ({exc})") from None


def _refusals(hf: dict) -> list[str]:
    problems = []
    if hf.get("model_type", "llama") != "llama":
        problems.append(f"model_type={hf.get('model_type')!r}: only 'llama' is mapped")
    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    if archs != ["LlamaForCausalLM"]:
        problems.append(f"architectures={archs}: only LlamaForCausalLM is mapped")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            problems.append(f"{key}=true: biases are not supported (megatron is built without them)")
    if hf.get("tie_word_embeddings", False):
        problems.append("tie_word_embeddings=true: Llama-3 keeps untied input and output "
                        "embeddings and so does the megatron model")
    if hf.get("sliding_window") or hf.get("use_sliding_window"):
        problems.append(f"sliding_window={hf.get('sliding_window')}: sliding-window attention is not "
                        "supported")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf.get('hidden_act')!r}: only SwiGLU (silu) is mapped")
    heads, hidden = hf.get("num_attention_heads"), hf.get("hidden_size")
    head_dim = hf.get("head_dim")
    if head_dim is not None and heads and hidden and head_dim * heads != hidden:
        problems.append(f"head_dim={head_dim}: must equal hidden_size/num_attention_heads="
                        f"{hidden}/{heads}")
    return problems


def model_config_from_hf(hf: dict, *, rope_theta: Optional[float] = None,
                         max_position_embeddings: Optional[int] = None,
                         where: str = "config.json") -> ModelConfig:
    """The ModelConfig of an HF Llama config (either RoPE layout: see rope.py); refuses what
    the mapping does not cover, in one line that names every offending key."""
    theta, rope_problems = read_rope(hf, rope_theta)
    problems = _refusals(hf) + rope_problems
    missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                           "num_attention_heads", "vocab_size") if k not in hf]
    if missing:
        problems.append(f"missing keys {missing}")
    if problems:
        raise ConversionError(f"{where}: cannot convert this model: " + "; ".join(problems))
    heads = int(hf["num_attention_heads"])
    return ModelConfig(
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=int(hf["hidden_size"]),
        ffn_hidden_size=int(hf["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        vocab_size=int(hf["vocab_size"]),
        max_position_embeddings=int(max_position_embeddings or hf.get("max_position_embeddings", 8192)),
        rotary_base=theta,
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
    )


def hf_config_from_model(m: ModelConfig, dtype: torch.dtype, template: Optional[dict] = None) -> dict:
    """An HF LlamaForCausalLM config.json for the model; fields the model does not determine
    (token ids, ...) come from `template` (the source model's config) when given. The RoPE base is
    the trained one, in the layout transformers 4 and 5 both read (the template's RoPE keys, in
    whichever layout, are dropped: a stale rope_parameters would win in transformers 5)."""
    cfg: dict[str, Any] = dict(template or {})
    for stale in ("_name_or_path", "transformers_version", "dtype", *STALE_ROPE_KEYS):
        cfg.pop(stale, None)
    cfg.update(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups,
        head_dim=m.kv_channels,
        vocab_size=m.vocab_size,
        max_position_embeddings=m.max_position_embeddings,
        **hub_layout(m.rotary_base),
        rms_norm_eps=m.norm_epsilon,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        torch_dtype=dtype_name(dtype),
    )
    cfg.setdefault("initializer_range", m.init_method_std)
    cfg.setdefault("pretraining_tp", 1)
    cfg.setdefault("use_cache", True)
    return cfg


def generation_config(hf_cfg: dict, template: Optional[dict] = None) -> dict:
    """generation_config.json: the source's when known, else the token ids of config.json."""
    if template:
        return dict(template)
    out: dict[str, Any] = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hf_cfg.get(key) is not None:
            out[key] = hf_cfg[key]
    return out


def model_config_yaml(m: ModelConfig) -> dict:
    """The `model:` section a training recipe reads (preset cleared: every field is explicit)."""
    fields = dataclasses.asdict(m)
    fields["preset"] = None
    return {"model": fields}


def load_model_section(path: str) -> ModelConfig:
    """ModelConfig from a YAML with a `model:` section (a converter model.yaml or a run config)."""
    import yaml

    from megatron_prolong.config import ConfigError, config_from_dict

    if not os.path.exists(path):
        raise ConversionError(f"{path}: model config not found")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise ConversionError(f"{path}: expected a YAML mapping with a `model:` section")
    try:
        return config_from_dict({"model": raw["model"]}, where=path).model
    except ConfigError as exc:
        raise ConversionError(str(exc)) from None
