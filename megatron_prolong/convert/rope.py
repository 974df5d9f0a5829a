"""The RoPE settings of an HF Llama config.json, in either of the layouts users have.

- transformers 4 and configs on the hub: top-level `rope_theta` and `rope_scaling` (null, or a
  mapping with `rope_type` / legacy `type` and the scaling fields);
- transformers 5: `rope_parameters: {rope_theta, rope_type, ...scaling fields}` and no top-level
  `rope_theta` (transformers 5 gives `rope_parameters` priority when both are present).

The megatron model has plain RoPE with one base, so only rope_type "default" converts; any
scaling (Llama-3.1's llama3, yarn, linear, dynamic, ...) is refused, and so is anything this
module cannot interpret, naming the key. The exported config states the base in the hub layout
(top-level rope_theta, rope_scaling null, no rope_parameters), which transformers 4 and 5 both read.
"""
from __future__ import annotations

import math
from typing import Any, Optional

PLAIN = "default"
SCALED_TYPES = ("linear", "dynamic", "yarn", "longrope", "llama3", "su", "mrope")
# Fields a plain RoPE mapping may hold besides its type (partial_rotary_factor only as 1.0).
PLAIN_FIELDS = {"rope_theta", "rope_type", "type", "partial_rotary_factor"}
DEFAULT_THETA = 10000.0  # what transformers' LlamaConfig assumes when a config states no base
# Every RoPE key of either layout: dropped from a template before an export states the base.
STALE_ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor")


def _theta_problem(key: str, value: Any) -> Optional[str]:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and value > 0
    return None if ok else f"{key}={value!r}: cannot interpret the RoPE base (expected a positive number)"


def _mapping_problems(key: str, params: Any, legacy: bool) -> list[str]:
    """Problems of one RoPE mapping (`rope_parameters` or the legacy `rope_scaling`)."""
    if not isinstance(params, dict):
        return [f"{key}={params!r}: cannot interpret (expected a mapping with rope_type)"]
    if any(isinstance(v, dict) for v in params.values()):
        return [f"{key}: per-layer-type RoPE settings {sorted(params)} cannot be interpreted "
                "(a Llama model has one RoPE)"]
    type_key = "rope_type" if "rope_type" in params or "type" not in params else "type"
    # transformers 5 fills in "default" when rope_parameters names no type; a legacy rope_scaling
    # mapping without one is not a config any transformers version reads.
    rope_type = params.get(type_key, None if legacy else PLAIN)
    if not isinstance(rope_type, str):
        return [f"{key}.{type_key}={rope_type!r}: cannot interpret the RoPE type"]
    if rope_type in SCALED_TYPES:
        detail = ", ".join(f"{k}={v}" for k, v in params.items() if k not in PLAIN_FIELDS)
        return [f"{key}.{type_key}={rope_type!r}{f' ({detail})' if detail else ''}: RoPE scaling "
                "is not supported; ProLong raises rope_theta instead (pass --rope-theta)"]
    if rope_type != PLAIN:
        return [f"{key}.{type_key}={rope_type!r}: cannot interpret this RoPE type (only plain "
                f"'{PLAIN}' RoPE converts)"]
    problems = [f"{key}.{k}={v!r}: cannot interpret this field of a plain RoPE"
                for k, v in params.items() if k not in PLAIN_FIELDS]
    factor = params.get("partial_rotary_factor", 1.0)
    if factor != 1.0:
        problems.append(f"{key}.partial_rotary_factor={factor!r}: partial RoPE is not supported")
    return problems


def read_rope(hf: dict, rope_theta: Optional[float] = None) -> tuple[float, list[str]]:
    """(the RoPE base to convert with, problems that forbid converting). `rope_theta` (the
    --rope-theta override) replaces whatever base the config states."""
    problems: list[str] = []
    thetas: dict[str, Any] = {}
    if "rope_theta" in hf:
        thetas["rope_theta"] = hf["rope_theta"]
    for key, legacy in (("rope_parameters", False), ("rope_scaling", True)):
        params = hf.get(key)
        if params is None:
            continue
        problems += _mapping_problems(key, params, legacy)
        if isinstance(params, dict) and "rope_theta" in params:
            thetas[f"{key}.rope_theta"] = params["rope_theta"]
    factor = hf.get("partial_rotary_factor", 1.0)
    if factor != 1.0:
        problems.append(f"partial_rotary_factor={factor!r}: partial RoPE is not supported")
    if rope_theta is not None:
        return float(rope_theta), problems
    values = set()
    for key, value in thetas.items():
        bad = _theta_problem(key, value)
        if bad:
            problems.append(bad)
        else:
            values.add(float(value))
    if len(values) > 1:
        stated = ", ".join(f"{k}={v!r}" for k, v in thetas.items())
        problems.append(f"{stated}: the config states different RoPE bases (transformers 4 reads "
                        "rope_theta, transformers 5 rope_parameters); fix config.json or pass "
                        "--rope-theta")
    return (values.pop() if len(values) == 1 else DEFAULT_THETA), problems


def hub_layout(theta: float) -> dict:
    """The RoPE keys of an exported config.json: one base, read alike by transformers 4 and 5."""
    return {"rope_theta": float(theta), "rope_scaling": None}
