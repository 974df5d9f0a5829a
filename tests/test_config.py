"""Recipes, presets, overrides and the validation rules, each error naming its field."""
import pytest
import yaml

from megatron_prolong.config import ConfigError, load_config, save_config, validate


def test_llama3_8b_preset_has_the_recipe_shape():
    m = load_config(None, ["model.preset=llama3-8b", "model.rotary_base=8e6"]).model
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size) == (32, 4096, 14336)
    assert (m.num_attention_heads, m.num_query_groups, m.vocab_size) == (32, 8, 128256)
    assert m.rotary_base == 8_000_000.0 and m.norm_epsilon == 1e-5


def test_recipe_file_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"preset": "tiny", "num_layers": 2},
        "training": {"seq_length": 1024, "global_batch_size": 4},
        "data": {"options": {"a": 1}},
    }))
    cfg = load_config(str(recipe), ["training.seq_length=2048", "optimizer.lr=2e-5",
                                    "data.options.b=2", "parallel.sequence_parallel=true"])
    assert cfg.model.num_layers == 2 and cfg.model.hidden_size == 128  # preset + explicit field
    assert cfg.training.seq_length == 2048 and cfg.optimizer.lr == 2e-5
    assert cfg.data.options == {"a": 1, "b": 2}
    assert cfg.parallel.sequence_parallel is True


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.preset=tiny", "training.train_steps=7"])
    save_config(cfg, str(tmp_path / "config.yaml"))
    again = load_config(str(tmp_path / "config.yaml"))
    assert again == cfg


@pytest.mark.parametrize("override,needle", [
    (["model.num_layerz=3"], "model.num_layerz: unknown field"),
    (["training.seq_length=abc"], "training.seq_length: expected an integer"),
    (["model.preset=llama9"], "model.preset: unknown preset"),
    (["training.seq_length"], "expected key=value"),
    (["parallel.sequence_parallel=maybe"], "parallel.sequence_parallel: expected true/false"),
])
def test_bad_fields_are_named(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, override)


def test_recipe_errors_point_at_the_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  preset: tiny\n  num_layerz: 3\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:3: model\.num_layerz: unknown field"):
        load_config(str(recipe))


def test_missing_recipe_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such/recipe.yaml")


@pytest.mark.parametrize("overrides,world,needle", [
    (["parallel.tensor=8"], 8, "parallel.tensor=8: must divide model.num_query_groups=4"),
    (["parallel.pipeline=3"], 3, "parallel.pipeline=3: must divide model.num_layers=4"),
    (["parallel.pipeline=2"], 3, "world size 3 is not a multiple"),
    (["parallel.tensor=4"], 6, "world size 6 is not a multiple"),
    (["parallel.context=2", "training.seq_length=1026"], 2,
     "training.seq_length=1026: must be divisible by 4"),
    (["parallel.context=16"], 16, "parallel.context=16: must divide the attention heads"),
    (["parallel.sequence_parallel=true"], 1, "needs parallel.tensor > 1"),
    (["training.global_batch_size=6"], 4, "training.global_batch_size=6: must be a multiple"),
    (["training.precision=fp16"], 1, "training.precision='fp16'"),
])
def test_layout_rules(overrides, world, needle):
    cfg = load_config(None, ["model.preset=tiny"] + overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world)
    assert needle in str(err.value)


def test_valid_layout_is_resolved():
    cfg = load_config(None, ["model.preset=llama3-8b", "parallel.tensor=8", "parallel.pipeline=2",
                             "training.seq_length=65536", "training.global_batch_size=64"])
    layout = validate(cfg, 64)
    assert (layout.tp, layout.pp, layout.cp, layout.dp, layout.num_microbatches) == (8, 2, 1, 4, 16)


def test_sequence_parallel_needs_transformer_engine(megatron_single_process):
    from megatron_prolong.model.llama import build_llama

    cfg = load_config(None, ["model.preset=tiny", "parallel.sequence_parallel=true"])
    with pytest.raises(ConfigError, match="parallel.sequence_parallel=true: needs the Transformer"):
        build_llama(cfg.model, cfg.parallel, on_cpu=True, use_te=False)


def test_fused_swiglu_only_off_the_cpu():
    """megatron's compiled SwiGLU on CUDA runs (model.fused_swiglu, default on); CPU runs keep
    the plain ops; TE's spec always fuses."""
    from megatron_prolong.model.llama import to_transformer_config

    cfg = load_config(None, ["model.preset=tiny"])
    fused = lambda **kw: to_transformer_config(cfg.model, cfg.parallel, **kw).bias_activation_fusion  # noqa: E731
    assert fused(on_cpu=False) and not fused(on_cpu=True) and fused(on_cpu=True, use_te=True)
    cfg = load_config(None, ["model.preset=tiny", "model.fused_swiglu=false"])
    assert not fused(on_cpu=False)


DEMO = "examples/demo_cpu.yaml"


def _error(recipe, overrides):
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with pytest.raises(ConfigError) as err:
        load_config(os.path.join(root, recipe) if recipe else None, overrides)
    return str(err.value)


def test_a_bad_override_is_named_with_the_nearest_field():
    message = _error(DEMO, ["training.train_step=10"])
    assert message == ("override training.train_step=10: training.train_step: unknown field; "
                       "did you mean training.train_steps?")
    # the recipe sets training.train_steps on its line 16, but the bad value is the override's
    assert _error(DEMO, ["training.train_steps=ten"]) == (
        "override training.train_steps=ten: training.train_steps: expected an integer, got 'ten'")
    assert _error(DEMO, ["trainng.seq_length=1"]).startswith(
        "override trainng.seq_length=1: trainng: unknown field; did you mean training?")
    assert "known fields are" in _error(None, ["training.zzz=1"])  # nothing close: the list


def test_recipe_errors_name_the_line_and_the_nearest_field(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  preset: tiny\ntraining:\n  seq_lenght: 3\n")
    assert _error(str(recipe), []) == (f"{recipe}:4: training.seq_lenght: unknown field; "
                                       "did you mean training.seq_length?")
    recipe.write_text("training:\n  train_steps: ten\n")
    assert _error(str(recipe), ["training.seq_length=64"]).startswith(
        f"{recipe}:2: training.train_steps: expected an integer")


@pytest.mark.parametrize("override", [
    "model.preset=!!python/object/apply:os.system [echo hacked]",
    "data.options=!!python/object/new:dict {}",
])
def test_yaml_tags_in_overrides_are_one_line_errors(override):
    message = _error(DEMO, [override])
    assert message.startswith(f"override {override}: not a valid YAML value: could not "
                              "determine a constructor for the tag")
    assert "\n" not in message


def test_yaml_tags_in_recipes_and_mixtures_are_one_line_errors(tmp_path):
    from megatron_prolong.data.config import load_mixture

    recipe = tmp_path / "r.yaml"
    recipe.write_text("training:\n  train_steps: !!python/object/apply:os.system [echo hi]\n")
    message = _error(str(recipe), [])
    assert message.startswith(f"{recipe}:2: not valid YAML: could not determine a constructor")
    assert "\n" not in message
    mixture = tmp_path / "mix.yaml"
    mixture.write_text("domains:\n  - !!python/object/apply:os.system [echo hi]\n")
    with pytest.raises(ValueError) as err:
        load_mixture(str(mixture))
    assert str(err.value).startswith(f"{mixture}:2: not valid YAML: could not determine")
    assert "\n" not in str(err.value)
