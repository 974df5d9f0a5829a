"""megatron-core's expected import-time warnings (no Transformer Engine / apex on this machine)
are filtered by the package itself, and only those."""
import os
import subprocess
import sys

import pytest

IMPORT_MEGATRON = ("import megatron_prolong, warnings; "
                   "import megatron.core.optimizer, megatron.core.models.gpt.gpt_layer_specs; "
                   "warnings.warn_explicit('another megatron warning', UserWarning, 'x.py', 1, "
                   "module='megatron.core.x')")


def _stderr(show: str) -> str:
    env = {**os.environ, "MEGATRON_PROLONG_SHOW_WARNINGS": show, "PYTHONWARNINGS": "default"}
    proc = subprocess.run([sys.executable, "-c", IMPORT_MEGATRON], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def test_expected_megatron_warnings_are_filtered_and_others_kept():
    shown = _stderr("1")
    if "Transformer Engine and Apex are not installed" not in shown:
        pytest.skip("Transformer Engine or apex is installed: megatron-core does not warn")
    assert "Apex is not installed" in shown
    quiet = _stderr("0")
    assert "not installed" not in quiet and "full scope is deprecated" not in quiet
    assert "another megatron warning" in quiet  # the filter is by message, not every warning


# What a resumed run and a tensor-parallel CPU run would print (the messages megatron-core
# 0.16.1 and torch 2.13 give, from the modules they come from).
LATER_WARNINGS = (
    "import megatron_prolong, sys, warnings\n"
    "if sys.argv[1] == 'cpu':\n"
    "    from megatron_prolong.cpu_compat import enable_cpu_execution; enable_cpu_execution()\n"
    "warnings.warn_explicit('`load_state_dict` is deprecated and will be removed in future "
    "versions. Please use `load` instead.', FutureWarning, 'torch.py', 799, "
    "module='megatron.core.dist_checkpointing.strategies.torch')\n"
    "warnings.warn_explicit('Please use DTensor instead and we are deprecating ShardedTensor.', "
    "FutureWarning, 'cpu_compat.py', 49, module='megatron_prolong.cpu_compat')\n"
    "warnings.warn_explicit('When using async grad allreduce it is recommended to set the "
    "environment variable CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup', UserWarning, "
    "'layers.py', 738, module='megatron.core.tensor_parallel.layers')\n")


def _later_stderr(mode: str, show: str = "0") -> str:
    # Python's default filters (FutureWarning and UserWarning shown), as a user's shell has
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["MEGATRON_PROLONG_SHOW_WARNINGS"] = show
    proc = subprocess.run([sys.executable, "-c", LATER_WARNINGS, mode], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def test_resume_deprecations_are_quiet_and_cuda_advice_only_on_cpu_runs():
    if __import__("torch").cuda.is_available():
        pytest.skip("enable_cpu_execution refuses a machine with a GPU")
    assert _later_stderr("cpu") == ""
    plain = _later_stderr("plain")  # a GPU run: the advice is real there
    assert "CUDA_DEVICE_MAX_CONNECTIONS" in plain and "deprecat" not in plain
    assert "ShardedTensor" in _later_stderr("plain", show="1")
