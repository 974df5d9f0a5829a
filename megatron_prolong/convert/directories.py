"""What a directory the user named holds, so that a tool given the wrong kind says which tool
(or option) takes it instead of failing deep inside a loader.

Kinds: missing, not_a_directory, hf (config.json: a Hugging Face model directory), run (a
training run or its checkpoints/ folder: config.yaml with checkpoints/, a `latest` pointer or
step_* directories),
step (a checkpoint step_N directory: train_state.json), weights (a bare megatron distributed
checkpoint: metadata.json, what hf-to-mcore writes), unknown. Only names are looked at; nothing
is read.
"""
from __future__ import annotations

import os

from megatron_prolong.convert.errors import ConversionError

MEGATRON_KINDS = ("run", "step", "weights")


def directory_kind(path: str) -> str:
    if not os.path.exists(path):
        return "missing"
    if not os.path.isdir(path):
        return "not_a_directory"

    def has(name: str) -> bool:
        return os.path.exists(os.path.join(path, name))

    if has("train_state.json"):
        return "step"
    if has("metadata.json"):
        return "weights"
    if (has("latest") or any(n.startswith("step_") for n in os.listdir(path))
            or (has("config.yaml") and os.path.isdir(os.path.join(path, "checkpoints")))):
        return "run"
    if has("config.json"):
        return "hf"
    return "unknown"


def require_hf_directory(path: str, option: str, megatron_advice: str) -> None:
    """Refuse `path` (given as `option`) unless it is a local Hugging Face model directory;
    `megatron_advice` says what to do with a megatron run or checkpoint instead."""
    kind = directory_kind(path)
    if kind == "missing":
        raise ConversionError(f"{option} {path}: no such directory ({option} takes a local "
                              "Hugging Face model directory; fetch one from the hub first, e.g. "
                              "`hf download NAME --local-dir DIR`)")
    if kind == "not_a_directory":
        raise ConversionError(f"{option} {path}: a file, not a directory; name the Hugging Face "
                              "model directory that holds config.json")
    if kind in MEGATRON_KINDS:
        what = {"run": "a training run", "step": "a training checkpoint (step directory)",
                "weights": "a megatron distributed checkpoint"}[kind]
        raise ConversionError(f"{option} {path}: this is {what}, not a Hugging Face model "
                              f"directory; {megatron_advice}")
    if kind != "hf":
        raise ConversionError(f"{option} {path}: no config.json; not a Hugging Face model "
                              "directory (name the directory that holds config.json and the "
                              "weights)")


def require_megatron_checkpoint(path: str, option: str, hf_advice: str) -> None:
    """Refuse `path` (given as `option`) unless it looks like a training run, a step directory
    or a megatron distributed checkpoint; `hf_advice` says what to do with an HF directory."""
    kind = directory_kind(path)
    if kind == "missing":
        raise ConversionError(f"{option} {path}: no such directory")
    if kind == "not_a_directory":
        raise ConversionError(f"{option} {path}: a file, not a directory; name a training run "
                              "directory, a checkpoints/step_N directory or a weights directory")
    if kind == "hf":
        raise ConversionError(f"{option} {path}: this is a Hugging Face model directory "
                              f"(config.json), not a megatron checkpoint; {hf_advice}")
    if kind == "unknown":
        raise ConversionError(f"{option} {path}: not a megatron checkpoint: expected a training "
                              "run directory (config.yaml and checkpoints/), a checkpoints/step_N "
                              "directory, or a weights directory (metadata.json, what "
                              "`tools/convert.py hf-to-mcore` writes)")
