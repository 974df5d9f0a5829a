"""mcore-to-hf takes a training run directory and follows its `latest` pointer."""
import os

from megatron_prolong.convert.mcore_to_hf import find_model_config, resolve_checkpoint


def test_run_directory_resolves_to_latest_dist_checkpoint(tmp_path):
    run = tmp_path / "run"
    for step in ("step_00000010", "step_00000020"):
        (run / "checkpoints" / step / "dist").mkdir(parents=True)
        (run / "checkpoints" / step / "dist" / "metadata.json").write_text("{}")
        (run / "checkpoints" / step / "train_state.json").write_text("{}")
    (run / "checkpoints" / "latest").write_text("step_00000020\n")
    (run / "config.yaml").write_text("model: {preset: tiny}\n")
    want = os.path.join(str(run), "checkpoints", "step_00000020", "dist")
    for given in (run, run / "checkpoints", run / "checkpoints" / "step_00000020", want):
        assert resolve_checkpoint(str(given)) == want
    # An older step stays addressable, and the run's config is found from the dist directory.
    older = run / "checkpoints" / "step_00000010"
    assert resolve_checkpoint(str(older)) == str(older / "dist")
    assert find_model_config(want) == str(run / "config.yaml")
