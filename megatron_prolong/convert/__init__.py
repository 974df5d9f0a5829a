"""Hugging Face Llama checkpoints <-> megatron-core distributed checkpoints.

- llama_mapping: the declarative weight-name table for the Llama family and its two reshapes
  (QKV grouped per query group, fc1 = [gate; up]).
- hf_config: HF config.json <-> ModelConfig, refusing architectures the table does not cover.
- rope: the RoPE base and scaling of config.json in either layout (transformers 4 / hub, or
  transformers 5's rope_parameters), and the layout exports write.
- hf_io: reading HF checkpoints (safetensors shards + index, or .bin) and writing sharded
  safetensors one tensor at a time.
- mcore_io: writing a layout-free megatron-core checkpoint; reading regions of one back.
- hf_to_mcore / mcore_to_hf: the two directions, used by tools/convert.py.
"""
from megatron_prolong.convert.errors import ConversionError

__all__ = ["ConversionError"]
