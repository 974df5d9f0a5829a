"""The training loop end to end on CPU: exact resume, preemption, atomic save, NaN handling,
resharded load and stage-2 style schedule reset."""
import math

import pytest

from distributed import run_distributed
from training_cases import resharding_cases, single_process_cases


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run_distributed(single_process_cases, 1, str(tmp_path_factory.mktemp("loop")))[0]


@pytest.mark.slow
def test_exact_resume_after_stopping(single):
    straight = single["straight"]
    assert sorted(straight) == [1, 2, 3, 4, 5, 6]
    assert straight[1] > straight[6], "the loss should fall"
    reason, first, resumed_from, second = single["stopped"]
    assert reason == "exit_at_step" and sorted(first) == [1, 2, 3]
    assert resumed_from.endswith("step_00000003")
    assert sorted(second) == [4, 5, 6]
    for step in range(1, 7):  # CPU fp32: bit-identical
        assert {**first, **second}[step] == straight[step], step


@pytest.mark.slow
def test_preemption_signal_saves_and_resumes(single):
    reason, final_step, latest, resumed = single["preempted"]
    assert (reason, final_step, latest) == ("preempted", 2, "step_00000002")
    assert sorted(resumed) == [3, 4, 5, 6]
    assert all(resumed[s] == single["straight"][s] for s in resumed)


@pytest.mark.slow
def test_crash_during_save_keeps_previous_checkpoint(single):
    error, left, resumed_from, losses, after = single["crashed"]
    assert "simulated crash" in error
    assert left == [".tmp-step_00000004", "latest", "step_00000002"]
    assert resumed_from.endswith("step_00000002")
    assert all(losses[s] == single["straight"][s] for s in (3, 4, 5, 6))
    assert after == ["latest", "step_00000004", "step_00000006"]  # tmp cleaned, keep_last=2


@pytest.mark.slow
def test_nan_steps_are_skipped_and_counted(single):
    losses, checksums = single["nan"]
    assert [math.isnan(losses[s]) for s in range(1, 7)] == [False, True, True, False, False, False]
    assert checksums[1] == checksums[2] == checksums[3], "a skipped step must not move weights"
    assert checksums[4] != checksums[3]
    # Steps 2-3 were skipped, so step 4 trains from step-1 weights: not the straight run's.
    assert losses[4] != single["straight"][4]


@pytest.mark.slow
def test_nan_streak_stops_and_keeps_last_good_checkpoint(single):
    message, latest = single["diverged"]
    assert "2 skipped steps (non-finite loss or gradient) in a row" in message
    assert "training.max_nan_steps=2" in message
    assert latest == "step_00000003"  # step 3 was skipped: its weights are step 2's
    assert "step_00000003" in message


@pytest.mark.slow
def test_resharded_load_and_schedule_reset(tmp_path):
    results = run_distributed(resharding_cases, 4, str(tmp_path))
    for r in results:
        assert sorted(r["tp1"]) == [3, 4, 5, 6]
        for step in (3, 4, 5, 6):
            want = r["tp2pp2"][step]
            assert abs(r["tp1"][step] - want) / want <= 1e-5, (step, r["tp1"][step], want)
        losses, final_step, adam_steps = r["stage2"]
        assert final_step == 2 and sorted(losses) == [1, 2]
        # Optimizer state came along (Adam's step count continues from 6), schedule restarted.
        assert adam_steps == {1: 7.0, 2: 8.0}


@pytest.mark.slow
def test_weights_only_checkpoint_initialises_a_run(single):
    source, losses = single["from_weights"]
    assert source.endswith("weights") and sorted(losses) == [1]
    # Same first batch as the straight run, but with its trained weights: a lower loss.
    assert losses[1] < single["straight"][1] - 0.05
