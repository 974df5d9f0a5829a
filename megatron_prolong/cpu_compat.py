"""Run megatron-core's real code paths on CPU processes (gloo), for tests and the CPU demo.

megatron-core assumes CUDA everywhere: tensors are created with
`device=torch.cuda.current_device()`, RNG state is read from the CUDA generator, and a few asserts
check `param.type() == 'torch.cuda.FloatTensor'`. This module redirects exactly those requests to
the CPU so that GPTModel, the tensor-parallel layers, the pipeline schedules, DDP, the optimizer and
dist_checkpointing run unchanged on CPU.

It is activated only by `enable_cpu_execution()`, which the launcher calls when no GPU is present.
Production GPU runs never import it into effect: nothing here runs on import.
"""
from __future__ import annotations

import threading

import torch
from torch.overrides import TorchFunctionMode

from megatron_prolong.expected_warnings import filter_cpu_run_warnings

_ENABLED = False
_LOCK = threading.Lock()


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is how megatron passes torch.cuda.current_device().
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Maps every CUDA device request made through torch functions to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's optimizer and grad clipping assert CUDA type names; report the CUDA name
            # for the same dtype so those asserts hold for CPU tensors.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if "cuda" not in name else name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func in (torch.Tensor.to,) and args:
            args = tuple("cpu" if (i > 0 and _is_cuda_device(a) and not isinstance(a, torch.Tensor))
                         else a for i, a in enumerate(args))
        return func(*args, **kwargs)


def _cpu_get_rng_state(*_args, **_kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(state, *_args, **_kwargs) -> None:
    torch.set_rng_state(state)


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.synchronize = lambda *a, **k: None
    cuda.get_rng_state = _cpu_get_rng_state
    cuda.set_rng_state = _cpu_set_rng_state
    # torch.manual_seed itself calls cuda.manual_seed_all: seed the CPU generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.set_device = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.max_memory_reserved = lambda *a, **k: 0
    cuda.random.get_rng_state = _cpu_get_rng_state
    cuda.random.set_rng_state = _cpu_set_rng_state


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state


def enable_cpu_execution() -> None:
    """Redirect megatron-core's CUDA requests to the CPU for the rest of this process."""
    global _ENABLED
    with _LOCK:
        if _ENABLED:
            return
        if torch.cuda.is_available():
            raise RuntimeError(
                "enable_cpu_execution() was called on a machine with a GPU; GPU runs must not go "
                "through the CPU compatibility layer (set device=cuda or leave device=auto)."
            )
        _patch_torch_cuda()
        _patch_megatron()
        filter_cpu_run_warnings()  # CUDA-only advice megatron-core gives every TP rank
        # Entered for the life of the process: the modes stack is per thread, so the autograd
        # engine's worker threads do not see it, but they only run backward kernels on existing
        # tensors and create nothing on a device.
        _CudaToCpuMode().__enter__()
        _ENABLED = True


def cpu_execution_enabled() -> bool:
    return _ENABLED
