"""Llama-3 as megatron-core's GPTModel: GQA, SwiGLU, RMSNorm, RoPE, untied embeddings, no biases."""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_prolong.config import ConfigError, ModelConfig, ParallelConfig
from megatron_prolong.model.attention import DocumentMaskedAttention
from megatron_prolong.model.context_parallel import te_context_parallel_kwargs
from megatron_prolong.model.initialization import initialize_layout_free
from megatron_prolong.model.loss import DEFAULT_CHUNK_SIZE, ChunkedLossGPTModel


def transformer_engine_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def use_transformer_engine(model: ModelConfig) -> bool:
    if model.attention_backend == "te":
        if not transformer_engine_available():
            raise RuntimeError(
                "model.attention_backend=te but Transformer Engine is not importable on CUDA; "
                "install the `gpu` extra (or use the NGC PyTorch container), or set "
                "model.attention_backend=local"
            )
        return True
    return model.attention_backend == "auto" and transformer_engine_available()


LAYERNORM_RECOMPUTE_NEEDS_TE = (
    "model.recompute_modules=layernorm: megatron-core 0.16.1's output-discarding layernorm "
    "recomputation runs only on the Transformer Engine spec (on the local spec its "
    "CheckpointWithoutOutput calls TE's FP8 state manager); use core_attn or mlp, or "
    "model.attention_backend=te")


def recompute_kwargs(model: ModelConfig) -> dict:
    """megatron-core's recomputation settings for a resolved `model.recompute` (`auto` is
    resolved from the memory model first: training/dry_run.py plan_recompute)."""
    if model.recompute == "selective":
        return dict(recompute_granularity="selective",
                    recompute_modules=list(model.recompute_modules))
    if model.recompute == "full":
        return dict(recompute_granularity="full", recompute_method=model.recompute_method,
                    recompute_num_layers=model.recompute_num_layers)
    if model.recompute != "none":
        raise ValueError(f"model.recompute={model.recompute!r} must be resolved before the "
                         "model is built (training/dry_run.py plan_recompute)")
    return {}


def to_transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    precision: str = "fp32",
    on_cpu: bool = False,
    use_te: bool = False,
) -> TransformerConfig:
    """Build megatron-core's TransformerConfig for a Llama-3-shaped model."""
    bf16 = precision == "bf16"
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        context_parallel_size=parallel.context,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        # Losses are sums over tokens divided by the global token count (document-masked
        # packed batches have varying loss-token counts; SFT needs token-scaled loss).
        calculate_per_token_loss=True,
        # SwiGLU's fusion is megatron's torch.compile'd kernel: any CUDA run (measured in
        # docs/performance.md). The others need apex/TE kernels; CPU runs use plain PyTorch.
        bias_activation_fusion=use_te or (model.fused_swiglu and not on_cpu),
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        use_cpu_initialization=on_cpu,
        **recompute_kwargs(model),
        # TE's own CP (cp_comm_type, a2a+p2p groups); the local path does Ulysses itself.
        **(te_context_parallel_kwargs(parallel.context, parallel.cp_comm_type) if use_te else {}),
    )


def llama_layer_spec(use_te: bool, local_attention_kernel: str = "auto") -> ModuleSpec:
    """Transformer Engine's spec on GPU clusters; otherwise megatron's local spec with the
    project's document-masked core attention (on `local_attention_kernel`) in place of its
    DotProductAttention."""
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec()
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=DocumentMaskedAttention, params={"kernel": local_attention_kernel})
    return spec


def build_llama(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    precision: str = "fp32",
    on_cpu: bool = False,
    pre_process: bool = True,
    post_process: bool = True,
    use_te: Optional[bool] = None,
    loss_chunk_size: int = DEFAULT_CHUNK_SIZE,
    init_seed: Optional[int] = None,
) -> GPTModel:
    """The model chunk of this pipeline stage (parallel_state must be initialized).

    With `init_seed` the weights are this stage's and rank's slices of one model drawn from the
    seed (model/initialization.py): the same under every parallel layout. Without it megatron's
    own per-shard initialisation, for callers that load weights right away.

    With labels the model returns per-token losses computed by the chunked cross-entropy
    (model/loss.py) in chunks of `loss_chunk_size` tokens; 0 uses megatron's full-logits loss.
    """
    if use_te is None:
        use_te = use_transformer_engine(model)
    if parallel.sequence_parallel and not use_te:
        # megatron-core's plain-torch RMSNorm cannot run sequence-parallel without apex or TE.
        raise ConfigError(
            "parallel.sequence_parallel=true: needs the Transformer Engine layer spec "
            "(model.attention_backend=te or auto on a GPU with TE installed); set "
            "parallel.sequence_parallel=false for the local attention path"
        )
    if (not use_te and model.recompute == "selective"
            and "layernorm" in model.recompute_modules):
        raise ConfigError(LAYERNORM_RECOMPUTE_NEEDS_TE)
    config = to_transformer_config(model, parallel, precision=precision, on_cpu=on_cpu,
                                   use_te=use_te)
    model_class = ChunkedLossGPTModel if loss_chunk_size > 0 else GPTModel
    extra = (dict(loss_chunk_size=loss_chunk_size, fused_loss=model.fused_loss)
             if loss_chunk_size > 0 else {})
    gpt = model_class(
        config=config,
        transformer_layer_spec=llama_layer_spec(use_te, model.local_attention_kernel),
        vocab_size=model.vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(model.rotary_base),
        **extra,
    )
    if init_seed is not None:
        # Over megatron's own initialisation, which stays on: it also marks the parameters
        # tensor-parallel (set_tensor_model_parallel_attributes), which the gradient norm and
        # clipping rely on.
        initialize_layout_free(gpt, config, init_seed)
    return gpt
