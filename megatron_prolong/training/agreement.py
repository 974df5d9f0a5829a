"""Start-up checks that every rank must fail together.

A check that fails on one rank only (rank 0 holds the run-directory lock and scans the data
for bad token ids) would leave the other ranks waiting in their next collective until the
process-group timeout. `on_all_ranks` runs a check on every rank, then exchanges the outcome
(one small all-gather), so that every rank raises the same one-line ConfigError and the
launch exits 2 everywhere at once (rank 0 prints the line; the error carries `all_ranks`).
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch.distributed as dist

from megatron_prolong.config import ConfigError

T = TypeVar("T")


def on_all_ranks(check: Callable[[], T]) -> T:
    """Collective. `check()` must not itself run collectives (a rank that raised early would
    never reach them). A ConfigError raised on any rank is raised on every rank."""
    error, value = None, None
    try:
        value = check()
    except ConfigError as exc:
        error = exc
    if dist.is_initialized() and dist.get_world_size() > 1:
        outcomes = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, None if error is None else str(error))
        first = next((rank for rank, msg in enumerate(outcomes) if msg is not None), None)
        if error is None and first is not None:
            error = ConfigError(f"{outcomes[first]} (found on rank {first})")
        if error is not None:
            error.all_ranks = True  # train.py: rank 0 alone prints it
    if error is not None:
        raise error
    return value
