"""HF Llama directory -> megatron-core distributed checkpoint + the model config that goes with it.

Output directory:
  metadata.json, .metadata, *.distcp, common.pt   the checkpoint (load_model_weights, any layout)
  model.yaml                                      `model:` section for a training recipe
  hf_config.json                                  the source config.json (token ids etc. for the
                                                  way back)
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
import yaml

from megatron_prolong.config import ConfigError, ModelConfig, ParallelConfig, RunConfig, validate
from megatron_prolong.convert import llama_mapping as lm
from megatron_prolong.convert.directories import require_hf_directory
from megatron_prolong.convert.errors import ConversionError
from megatron_prolong.convert.hf_config import model_config_from_hf, model_config_yaml, read_json
from megatron_prolong.convert.hf_io import HFCheckpoint
from megatron_prolong.convert.mcore_io import save_mcore_checkpoint
from megatron_prolong.convert.staging import staged_output


def check_layout(model: ModelConfig, tp: int = 1, pp: int = 1, cp: int = 1) -> None:
    """Refuse a target layout the model cannot be split into (config.validate's rules)."""
    cfg = RunConfig(model=model, parallel=ParallelConfig(tensor=tp, pipeline=pp, context=cp))
    try:
        validate(cfg, tp * pp * cp)
    except ConfigError as exc:
        raise ConversionError(f"target layout TP={tp} PP={pp} CP={cp} does not fit this model: {exc}") from None


def check_hf_tensors(ckpt: HFCheckpoint, model: ModelConfig, dtype: Optional[torch.dtype]) -> torch.dtype:
    """Names, shapes and dtypes against the mapping, before anything is loaded; returns the dtype
    the checkpoint will be written in."""
    expected = {}
    for unit in lm.units(model):
        expected.update(zip(unit.hf_names(), lm.hf_shapes(unit.rule, model)))
    problems = []
    names = {n for n in ckpt.tensors if not n.endswith(lm.IGNORED_HF_SUFFIXES)}
    for name in sorted(names - set(expected)):
        problems.append(f"{name}: {lm.unsupported_reason(name)}")
    missing = sorted(set(expected) - names)
    if missing:
        problems.append(f"missing tensors {missing[:6]}{'...' if len(missing) > 6 else ''} "
                        "(a shard or an index entry is missing, or config.json does not describe "
                        "these weights)")
    for name in sorted(names & set(expected)):
        if ckpt.tensors[name].shape != expected[name]:
            problems.append(f"{name}: shape {list(ckpt.tensors[name].shape)}, config.json implies "
                            f"{list(expected[name])}")
    dtypes = {ckpt.tensors[n].dtype for n in names & set(expected)}
    if any(not d.is_floating_point for d in dtypes):
        problems.append(f"non-float weights {sorted(map(str, dtypes))}")
    elif dtype is None and len(dtypes) > 1:
        problems.append(f"mixed dtypes {sorted(map(str, dtypes))}; pass --dtype to choose one")
    if problems:
        raise ConversionError(f"{ckpt.directory}: cannot convert: " + "; ".join(problems))
    return dtype or dtypes.pop()


def hf_to_mcore(hf_dir: str, out_dir: str, *, rope_theta: Optional[float] = None,
                max_position_embeddings: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                target: tuple[int, int, int] = (1, 1, 1), overwrite: bool = False) -> ModelConfig:
    require_hf_directory(hf_dir, "--hf-dir", "to export it to Hugging Face, use "
                         f"`tools/convert.py mcore-to-hf --checkpoint {hf_dir} --out OUT`; "
                         "training loads it as it is (checkpoint.load=...)")
    hf_cfg = read_json(os.path.join(hf_dir, "config.json"))
    model = model_config_from_hf(hf_cfg, rope_theta=rope_theta,
                                 max_position_embeddings=max_position_embeddings,
                                 where=os.path.join(hf_dir, "config.json"))
    check_layout(model, *target)
    ckpt = HFCheckpoint(hf_dir)
    dtype = check_hf_tensors(ckpt, model, dtype)

    def produce(unit: lm.Unit) -> torch.Tensor:  # called while writing, one unit at a time
        return lm.to_mcore(unit.rule, [ckpt.get(n) for n in unit.hf_names()], model)

    with staged_output(out_dir, overwrite) as tmp:
        save_mcore_checkpoint(model, dtype, produce, tmp)
        with open(os.path.join(tmp, "model.yaml"), "w") as f:
            yaml.safe_dump(model_config_yaml(model), f, sort_keys=False)
        with open(os.path.join(tmp, "hf_config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2)
    return model
