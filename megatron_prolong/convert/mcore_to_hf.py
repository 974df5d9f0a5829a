"""megatron-core distributed checkpoint (any TP/PP layout, TE or local spec) -> HF Llama directory:
config.json, generation_config.json, sharded safetensors + index, tokenizer files."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import torch

from megatron_prolong.config import ModelConfig
from megatron_prolong.convert import llama_mapping as lm
from megatron_prolong.convert.directories import require_megatron_checkpoint
from megatron_prolong.convert.errors import ConversionError
from megatron_prolong.convert.hf_config import (generation_config, hf_config_from_model,
                                                load_model_section, read_json)
from megatron_prolong.convert.hf_io import (PlannedTensor, copy_tokenizer_files, parse_size,
                                            plan_shards, write_sharded)
from megatron_prolong.convert.staging import staged_output
from megatron_prolong.convert.mcore_io import check_checkpoint_dir, read_regions, tensor_metadata

MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")


def resolve_checkpoint(path: str) -> str:
    """A training run directory, its checkpoints/ directory or a step_N directory -> the
    distributed checkpoint inside (the `latest` pointer decides which step); a bare
    distributed checkpoint directory is returned as it is."""
    from megatron_prolong.training.checkpoint import resolve_checkpoint as resolve_training

    step = resolve_training(path, must_exist=False)
    if step is not None and os.path.isdir(os.path.join(step, "dist")):
        return os.path.join(step, "dist")
    return os.path.abspath(path)


def find_model_config(checkpoint: str) -> str:
    """model.yaml written by hf-to-mcore, else the run's resolved config.yaml nearby."""
    here = os.path.abspath(checkpoint)
    candidates = [os.path.join(here, "model.yaml"), os.path.join(here, "config.yaml"),
                  os.path.join(os.path.dirname(here), "config.yaml"),
                  os.path.join(os.path.dirname(os.path.dirname(here)), "config.yaml"),
                  # a training run's run_dir/checkpoints/step_N/dist
                  os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(here))),
                               "config.yaml")]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise ConversionError(f"{checkpoint}: no model config found (looked for {candidates}); pass "
                          "--model-config with a YAML holding a `model:` section")


def check_checkpoint_tensors(meta: dict, model: ModelConfig, where: str) -> torch.dtype:
    """Every mapped key present with the shape the model config implies; returns its dtype."""
    problems = []
    expected = {lm.Unit(r, 0).checkpoint_key: lm.checkpoint_shape(r, model) for r in lm.LLAMA_RULES}
    for key, shape in expected.items():
        if key not in meta:
            problems.append(f"{key}: missing")
        elif meta[key][0] != shape:
            problems.append(f"{key}: shape {list(meta[key][0])}, the model config implies {list(shape)}")
    for key in sorted(k for k in meta if k.startswith(MODEL_PREFIXES) and k not in expected):
        problems.append(f"{key}: not covered by the Llama mapping (biases? another architecture?)")
    dtypes = {meta[k][1] for k in expected if k in meta}
    if len(dtypes) > 1:
        problems.append(f"mixed dtypes {sorted(map(str, dtypes))}")
    if problems:
        raise ConversionError(f"{where}: does not match the model config: " + "; ".join(problems))
    return dtypes.pop()


def mcore_to_hf(checkpoint: str, out_dir: str, *, model_config: Optional[str] = None,
                rope_theta: Optional[float] = None, max_position_embeddings: Optional[int] = None,
                dtype: Optional[torch.dtype] = None, tokenizer_dir: Optional[str] = None,
                hf_config: Optional[str] = None, max_shard_size: str = "5GB",
                overwrite: bool = False) -> dict:
    require_megatron_checkpoint(checkpoint, "--checkpoint", "to convert it to megatron, use "
                                f"`tools/convert.py hf-to-mcore --hf-dir {checkpoint} --out OUT`")
    checkpoint = resolve_checkpoint(checkpoint)
    check_checkpoint_dir(checkpoint)
    model = load_model_section(model_config or find_model_config(checkpoint))
    overrides = {}
    if rope_theta is not None:
        overrides["rotary_base"] = float(rope_theta)
    if max_position_embeddings is not None:
        overrides["max_position_embeddings"] = int(max_position_embeddings)
    model = dataclasses.replace(model, **overrides)
    stored = check_checkpoint_tensors(tensor_metadata(checkpoint), model, checkpoint)
    dtype = dtype or stored
    max_bytes = parse_size(max_shard_size)

    template_path = hf_config or next(
        (p for p in [os.path.join(checkpoint, "hf_config.json"),
                     tokenizer_dir and os.path.join(tokenizer_dir, "config.json")]
         if p and os.path.isfile(p)), None)
    template = read_json(template_path) if template_path else None
    cfg = hf_config_from_model(model, dtype, template)
    gen_path = tokenizer_dir and os.path.join(tokenizer_dir, "generation_config.json")
    gen = generation_config(cfg, read_json(gen_path) if gen_path and os.path.isfile(gen_path) else None)

    all_units = lm.units(model)
    groups = [[PlannedTensor(n, dtype, s) for n, s in zip(u.hf_names(), lm.hf_shapes(u.rule, model))]
              for u in all_units]
    shards = plan_shards(groups, max_bytes)

    def tensors():
        for unit in all_units:  # one layer of one megatron tensor in memory at a time
            (region,) = read_regions(checkpoint, [(unit.checkpoint_key, unit.layer,
                                                   lm.mcore_shape(unit.rule, model), stored)])
            for name, t in zip(unit.hf_names(), lm.to_hf(unit.rule, region, model)):
                yield name, t.to(dtype)

    with staged_output(out_dir, overwrite) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        if gen:
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump(gen, f, indent=2)
        if tokenizer_dir:
            copy_tokenizer_files(tokenizer_dir, tmp)
        write_sharded(tmp, shards, tensors())
    return cfg
