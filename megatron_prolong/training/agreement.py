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
    never reach them). A ConfigError raised on any rank is raised on every rank; any other
    exception is re-raised where it happened and ends the other ranks with a RuntimeError
    naming that rank (a crash with a traceback, but no hang)."""
    error, value = None, None
    try:
        value = check()
    except Exception as exc:  # noqa: BLE001 - every failure must reach the other ranks
        error = exc
    if dist.is_initialized() and dist.get_world_size() > 1:
        mine = None if error is None else (isinstance(error, ConfigError), str(error))
        outcomes = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, mine)
        first = next((rank for rank, outcome in enumerate(outcomes) if outcome), None)
        if error is None and first is not None:
            is_config, message = outcomes[first]
            error = (ConfigError(f"{message} (found on rank {first})") if is_config else
                     RuntimeError(f"rank {first} failed at start-up: {message}"))
        if isinstance(error, ConfigError):
            error.all_ranks = True  # train.py: rank 0 alone prints it
    if error is not None:
        raise error
    return value
