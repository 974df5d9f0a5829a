"""megatron-core's import-time warnings that this project expects, filtered in one place.

Importing megatron-core without Transformer Engine and apex (CPU runs: the demo, the tests, the
converter and data tools) prints seven UserWarnings before a run's first line: "Transformer
Engine and Apex are not installed. Falling back to ..." (x4), "Apex is not installed. Falling
back to Torch Norm" (x2), and "full scope is deprecated" (megatron-core 0.16.1 warns about its
own default `cuda_graph_scope`). The fallbacks are the paths this project chooses on purpose
(the local layer spec, torch optimizers and norms); for GPU clusters README.md says how to
install Transformer Engine and apex.

The filter is installed by `megatron_prolong/__init__.py`, so it is in place before any entry
point or tool imports megatron-core; it matches these messages from megatron modules only.
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


def filter_expected_warnings() -> None:
    if os.environ.get("MEGATRON_PROLONG_SHOW_WARNINGS", "") not in ("", "0"):
        return
    for message in EXPECTED_MEGATRON_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning,
                                module=r"megatron\.")
