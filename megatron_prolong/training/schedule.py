"""Learning-rate schedule: linear warmup over a fraction of the steps, then decay to a floor.

ProLong: warmup over 10% (SFT 5%) of the steps, cosine decay to 10% of the peak. The schedule is
a pure function of the step, so resuming needs only the step number; `start_step` lets stage 2
restart the schedule while keeping the optimizer state (checkpoint.reset_schedule).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_prolong.config import RunConfig


@dataclass
class LRSchedule:
    peak_lr: float
    total_steps: int
    warmup_steps: int
    min_lr: float
    decay_style: str = "cosine"  # cosine | linear | constant

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "LRSchedule":
        total = cfg.training.total_steps()
        return cls(
            peak_lr=cfg.optimizer.lr,
            total_steps=total,
            warmup_steps=int(round(cfg.scheduler.warmup_fraction * total)),
            min_lr=cfg.optimizer.lr * cfg.optimizer.min_lr_ratio,
            decay_style=cfg.scheduler.decay_style,
        )

    def __post_init__(self) -> None:
        if self.decay_style not in ("cosine", "linear", "constant"):
            raise ValueError(f"scheduler.decay_style={self.decay_style!r}: choose cosine, "
                             "linear or constant")

    def lr(self, step: int) -> float:
        """LR for the optimizer step that takes the model from `step` to `step + 1`
        (0-based): warmup reaches the peak at the last warmup step, the decay reaches
        min_lr at the last step."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        if self.decay_style == "constant":
            return self.peak_lr
        decay_steps = self.total_steps - self.warmup_steps - 1
        if decay_steps <= 0:
            return self.peak_lr
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        if self.decay_style == "linear":
            factor = 1.0 - progress
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + (self.peak_lr - self.min_lr) * factor
