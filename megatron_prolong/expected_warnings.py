"""megatron-core's import-time warnings that this project expects, filtered in one place.

Importing megatron-core without Transformer Engine and apex (CPU runs: the demo, the tests, the
converter and data tools) prints seven UserWarnings before a run's first line: "Transformer
Engine and Apex are not installed. Falling back to ..." (x4), "Apex is not installed. Falling
back to Torch Norm" (x2), and "full scope is deprecated" (megatron-core 0.16.1 warns about its
own default `cuda_graph_scope`). The fallbacks are the paths this project chooses on purpose
(the local layer spec, torch optimizers and norms); for GPU clusters README.md says how to
install Transformer Engine and apex.

Resuming a run adds two FutureWarnings about torch APIs megatron-core 0.16.1's checkpoint
loader still uses (`load_state_dict` is deprecated ..., ... deprecating ShardedTensor): a user
cannot act on them, so they are filtered too.

The filter is installed by `megatron_prolong/__init__.py`, so it is in place before any entry
point or tool imports megatron-core; it matches these messages from megatron modules only.
CPU runs (cpu_compat.enable_cpu_execution) also filter megatron-core's advice to set
CUDA_DEVICE_MAX_CONNECTIONS=1 (once per tensor-parallel rank), which means nothing without
CUDA; GPU runs keep it (slurm/common.sh sets the variable).
Set MEGATRON_PROLONG_SHOW_WARNINGS=1 to see them again.
"""
from __future__ import annotations

import os
import warnings

EXPECTED_MEGATRON_WARNINGS = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed\. Falling back to Torch Norm",
    r"full scope is deprecated",
)
# (message, category, module) of the checkpoint loader's torch deprecations. The ShardedTensor
# one is reported from wherever the call passes last (cpu_compat's redirect on CPU): any module.
EXPECTED_RESUME_WARNINGS = (
    (r"`load_state_dict` is deprecated", FutureWarning, r"megatron\."),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning, ""),
)
CPU_RUN_WARNINGS = (r"When using .* it is recommended to set the environment variable "
                    r"CUDA_DEVICE_MAX_CONNECTIONS to 1",)


def _showing_all() -> bool:
    return os.environ.get("MEGATRON_PROLONG_SHOW_WARNINGS", "") not in ("", "0")


def filter_expected_warnings() -> None:
    if _showing_all():
        return
    for message in EXPECTED_MEGATRON_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning,
                                module=r"megatron\.")
    for message, category, module in EXPECTED_RESUME_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def filter_cpu_run_warnings() -> None:
    """For processes that run megatron-core on the CPU (cpu_compat.enable_cpu_execution)."""
    if _showing_all():
        return
    for message in CPU_RUN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning,
                                module=r"megatron\.")
