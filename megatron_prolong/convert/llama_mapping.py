"""The Llama family's weight mapping between Hugging Face and megatron-core, in one table.

Each `Rule` names a megatron-core tensor, the HF tensors it is made of, and how they combine:
- COPY: the same tensor under another name.
- QKV: megatron's linear_qkv interleaves per query group [q heads of the group; k; v], so that a
  tensor-parallel split along rows hands each rank whole groups. HF keeps q, k, v apart.
- GATE_UP: megatron's linear_fc1 is [gate; up] (dist_checkpointing splits it per TP rank into
  [gate_r; up_r] itself).
No RoPE permutation is needed: HF's rotate_half layout is megatron's non-interleaved RoPE.

Megatron names are the Transformer Engine spec's module names, which are also the keys of the
distributed checkpoint (the local spec maps its own names onto them in sharded_state_dict), so a
checkpoint saved by either spec reads the same. `module_name(..., spec="local")` gives the local
spec's parameter names, where the norms live in their own modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional

import torch

from megatron_prolong.config import ModelConfig
from megatron_prolong.convert.errors import ConversionError


class Kind(Enum):
    COPY = "copy"
    QKV = "qkv"
    GATE_UP = "gate_up"


@dataclass(frozen=True)
class Rule:
    mcore: str  # TE-spec name; per-layer rules are relative to decoder.layers.{i}.
    hf: tuple[str, ...]  # per-layer rules are relative to model.layers.{i}.
    kind: Kind = Kind.COPY
    per_layer: bool = True


LLAMA_RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), per_layer=False),
    Rule("self_attention.linear_qkv.layer_norm_weight", ("input_layernorm.weight",)),
    Rule("self_attention.linear_qkv.weight",
         ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), Kind.QKV),
    Rule("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",)),
    Rule("mlp.linear_fc1.layer_norm_weight", ("post_attention_layernorm.weight",)),
    Rule("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), Kind.GATE_UP),
    Rule("mlp.linear_fc2.weight", ("mlp.down_proj.weight",)),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), per_layer=False),
    Rule("output_layer.weight", ("lm_head.weight",), per_layer=False),
)

# Where the local (non-TE) spec keeps what TE fuses into its layernorm-linear modules.
LOCAL_SPEC_RENAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
SPECS = ("te", "local")

# HF tensors that carry no weights (old checkpoints saved RoPE's inverse frequencies).
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Unit:
    """One rule applied to one layer (layer None for the embedding, final norm and output)."""

    rule: Rule
    layer: Optional[int]

    def hf_names(self) -> list[str]:
        if not self.rule.per_layer:
            return list(self.rule.hf)
        return [f"model.layers.{self.layer}.{name}" for name in self.rule.hf]

    def module_name(self, spec: str = "te") -> str:
        """The parameter name in GPTModel.state_dict() under the given layer spec."""
        if spec not in SPECS:
            raise ConversionError(f"unknown layer spec {spec!r}; choose one of {SPECS}")
        if not self.rule.per_layer:
            return self.rule.mcore
        name = LOCAL_SPEC_RENAMES.get(self.rule.mcore, self.rule.mcore) if spec == "local" else self.rule.mcore
        return f"decoder.layers.{self.layer}.{name}"

    @property
    def checkpoint_key(self) -> str:
        """The distributed checkpoint's key; per-layer tensors are stacked along a leading axis."""
        return f"decoder.layers.{self.rule.mcore}" if self.rule.per_layer else self.rule.mcore


def units(model: ModelConfig) -> list[Unit]:
    """Every unit in HF's canonical order (embedding, layer by layer, final norm, output)."""
    head = [Unit(r, None) for r in LLAMA_RULES if not r.per_layer and r.mcore.startswith("embedding")]
    tail = [Unit(r, None) for r in LLAMA_RULES if not r.per_layer and not r.mcore.startswith("embedding")]
    layers = [Unit(r, i) for i in range(model.num_layers) for r in LLAMA_RULES if r.per_layer]
    return head + layers + tail


def checkpoint_keys() -> list[str]:
    return [Unit(r, 0).checkpoint_key for r in LLAMA_RULES]


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------
def hf_shapes(rule: Rule, m: ModelConfig) -> list[tuple[int, ...]]:
    """The shapes HF stores for a rule's tensors (nn.Linear weights are [out, in])."""
    h, d = m.hidden_size, m.kv_channels
    by_name = {
        "model.embed_tokens.weight": (m.vocab_size, h),
        "lm_head.weight": (m.vocab_size, h),
        "model.norm.weight": (h,),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (m.num_attention_heads * d, h),
        "self_attn.k_proj.weight": (m.num_query_groups * d, h),
        "self_attn.v_proj.weight": (m.num_query_groups * d, h),
        "self_attn.o_proj.weight": (h, m.num_attention_heads * d),
        "mlp.gate_proj.weight": (m.ffn_hidden_size, h),
        "mlp.up_proj.weight": (m.ffn_hidden_size, h),
        "mlp.down_proj.weight": (h, m.ffn_hidden_size),
    }
    return [by_name[name] for name in rule.hf]


def mcore_shape(rule: Rule, m: ModelConfig) -> tuple[int, ...]:
    """The megatron tensor's shape for one layer (TP=1)."""
    shapes = hf_shapes(rule, m)
    if rule.kind is Kind.COPY:
        return shapes[0]
    return (sum(s[0] for s in shapes), shapes[0][1])


def checkpoint_shape(rule: Rule, m: ModelConfig) -> tuple[int, ...]:
    """The global shape in the distributed checkpoint (layer-stacked for per-layer rules)."""
    shape = mcore_shape(rule, m)
    return (m.num_layers, *shape) if rule.per_layer else shape


# ---------------------------------------------------------------------------------------------
# The reshapes, in both directions
# ---------------------------------------------------------------------------------------------
def to_mcore(rule: Rule, tensors: list[torch.Tensor], m: ModelConfig) -> torch.Tensor:
    if rule.kind is Kind.COPY:
        return tensors[0]
    if rule.kind is Kind.GATE_UP:
        return torch.cat(tensors, dim=0)
    q, k, v = tensors
    g, d, h = m.num_query_groups, m.kv_channels, m.hidden_size
    per_group = m.num_attention_heads // g
    grouped = torch.cat([q.reshape(g, per_group * d, h), k.reshape(g, d, h), v.reshape(g, d, h)], dim=1)
    return grouped.reshape(-1, h)


def to_hf(rule: Rule, tensor: torch.Tensor, m: ModelConfig) -> list[torch.Tensor]:
    """The HF tensors of a rule, each contiguous (ready to be written)."""
    if rule.kind is Kind.COPY:
        return [tensor.contiguous()]
    if rule.kind is Kind.GATE_UP:
        return [t.contiguous() for t in tensor.chunk(2, dim=0)]
    g, d, h = m.num_query_groups, m.kv_channels, m.hidden_size
    per_group = m.num_attention_heads // g
    grouped = tensor.reshape(g, (per_group + 2) * d, h)
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    return [q.reshape(-1, h).contiguous(), k.reshape(-1, h).contiguous(), v.reshape(-1, h).contiguous()]


def unsupported_reason(hf_name: str) -> str:
    """Why an HF tensor outside the table cannot be converted (for the refusal message)."""
    if hf_name.endswith(".bias"):
        return "biases are not supported (Llama-3 has none; megatron is built with add_bias_linear=False)"
    return "not part of the Llama mapping (a different architecture?)"
