import math

import pytest

from megatron_prolong.config import load_config
from megatron_prolong.training.schedule import LRSchedule


def test_warmup_peak_and_final_value():
    s = LRSchedule(peak_lr=1e-5, total_steps=100, warmup_steps=10, min_lr=1e-6)
    assert s.lr(0) == pytest.approx(1e-6)  # 1/10 of the peak on the first step
    assert s.lr(9) == pytest.approx(1e-5)  # warmup ends at the peak
    assert s.lr(10) == pytest.approx(1e-5)  # cosine starts at the peak
    assert s.lr(99) == pytest.approx(1e-6)  # and ends at min_lr_ratio x peak
    mid = 10 + (99 - 10) / 2
    assert s.lr(int(mid)) == pytest.approx(1e-6 + 9e-6 * 0.5 * (1 + math.cos(math.pi * 44 / 89)))
    values = [s.lr(k) for k in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_recipe_schedules():
    s1 = LRSchedule.from_config(load_config("examples/stage1_64k.yaml"))
    assert (s1.total_steps, s1.warmup_steps) == (4769, 477)  # 20B / (64 x 65,536)
    assert s1.lr(476) == pytest.approx(1e-5) and s1.lr(4768) == pytest.approx(1e-6)
    sft = LRSchedule.from_config(load_config("examples/sft.yaml"))
    assert (sft.total_steps, sft.warmup_steps) == (239, 12)
    assert sft.lr(11) == pytest.approx(2e-5) and sft.lr(238) == pytest.approx(2e-6)


def test_linear_and_constant_styles():
    lin = LRSchedule(1.0, 11, 0, 0.0, "linear")
    assert [lin.lr(k) for k in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    assert LRSchedule(1.0, 11, 2, 0.0, "constant").lr(10) == 1.0
    with pytest.raises(ValueError, match="decay_style"):
        LRSchedule(1.0, 10, 1, 0.1, "step")
