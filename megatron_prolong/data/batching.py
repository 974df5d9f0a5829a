"""Global batch -> per-rank micro-batches, with optional smart batching.

A global batch is samples [N, N + G) where N is the consumed-sample count (stored in
checkpoints) and G = dp_size * num_micro_batches * micro_batch_size.

Assignment rule (``smart_batch_plan``):
* smart batching off (megatron's default): rank r takes positions [r*G/dp, (r+1)*G/dp) in order
  and cuts them into consecutive micro-batches of ``micro_batch_size``.
* smart batching on: positions are sorted by attention cost (sum of squared document lengths),
  most expensive first, ties by position (stable). Consecutive runs of ``micro_batch_size`` form
  micro-batches c = 0, 1, ...; micro-batch c goes to rank c % dp at step c // dp. So at every
  step the dp ranks hold the dp most similar micro-batches left, and steps run from the most to
  the least expensive (peak memory shows up at the first step).
Both rules are permutations of the global batch: no sample is lost or duplicated.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from .packing import attention_cost, collate_packed


def smart_batch_plan(costs: Sequence[float], dp_size: int, micro_batch_size: int,
                     enabled: bool = True) -> list[list[list[int]]]:
    """plan[rank][step] = positions (0..G-1) within the global batch for that micro-batch."""
    G = len(costs)
    if G % (dp_size * micro_batch_size):
        raise ValueError(f"global batch of {G} samples is not divisible by dp_size*"
                         f"micro_batch_size = {dp_size}*{micro_batch_size}")
    steps = G // (dp_size * micro_batch_size)
    if not enabled:
        per_rank = G // dp_size
        return [[list(range(r * per_rank + j * micro_batch_size,
                            r * per_rank + (j + 1) * micro_batch_size)) for j in range(steps)]
                for r in range(dp_size)]
    order = np.argsort(-np.asarray(costs, dtype=np.float64), kind="stable").tolist()
    plan: list[list[list[int]]] = [[None] * steps for _ in range(dp_size)]  # type: ignore
    for c in range(G // micro_batch_size):
        plan[c % dp_size][c // dp_size] = order[c * micro_batch_size:(c + 1) * micro_batch_size]
    return plan


class RankBatchIterator:
    """Yields, per optimizer step, this DP rank's list of collated micro-batches.

    ``consumed_samples`` advances by the global batch size per step; save it in checkpoints
    and pass it back to resume exactly.
    """

    def __init__(self, dataset, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, consumed_samples: int = 0, smart_batching: bool = True,
                 pad_to_multiple_of: int = 1, max_samples: Optional[int] = None) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        self.dataset, self.G, self.mbs = dataset, global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = consumed_samples
        self.smart_batching, self.pad_to_multiple_of = smart_batching, pad_to_multiple_of
        self.max_samples = max_samples

    def plan_for(self, start: int) -> list[list[int]]:
        """Global sample indices per micro-batch for this rank, for the batch at `start`."""
        costs = ([attention_cost(np.concatenate([[0], np.cumsum(
                    self.dataset.segment_lengths(start + p))])) for p in range(self.G)]
                 if self.smart_batching else [0] * self.G)
        plan = smart_batch_plan(costs, self.dp_size, self.mbs, self.smart_batching)
        return [[start + p for p in mb] for mb in plan[self.dp_rank]]

    def __iter__(self) -> Iterator[list[dict]]:
        return self

    def __next__(self) -> list[dict]:
        return self.next_batches()

    def next_batches(self, interrupted: Optional[Callable[[], bool]] = None
                     ) -> Optional[list[dict]]:
        """This rank's micro-batches of the next step. `interrupted()` is asked after each
        micro-batch: when it says True the step is given up (None; consumed_samples unchanged),
        so a preemption signal does not wait for a long collection to finish."""
        start = self.consumed_samples
        if self.max_samples is not None and start + self.G > self.max_samples:
            raise StopIteration
        batches = []
        for mb in self.plan_for(start):
            batches.append(collate_packed([self.dataset[i] for i in mb], self.pad_to_multiple_of))
            if interrupted is not None and interrupted():
                return None
        self.consumed_samples += self.G
        return batches
