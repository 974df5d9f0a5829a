"""The evaluation section: list overrides from the command line, and rules that name the field."""
import pytest

from megatron_prolong.config import ConfigError, load_config, validate


def test_list_fields_from_yaml_lists_and_comma_separated_overrides():
    cfg = load_config("examples/demo_cpu.yaml", ["evaluation.recall_tasks=niah_mk,json_kv",
                                                 "evaluation.recall_lengths=[2048, 4096]",
                                                 "evaluation.recall_depths=0.5"])
    e = cfg.evaluation
    assert e.recall_tasks == ["niah_mk", "json_kv"] and e.recall_lengths == [2048, 4096]
    assert e.recall_depths == [0.5] and e.interval == 20 and e.heldout_docs == 2
    validate(cfg, 1)


@pytest.mark.parametrize("override,needle", [
    (["evaluation.recall_tasks=json_kv,haystack"], "evaluation.recall_tasks: unknown task"),
    (["evaluation.recall_depths=[0, 1.5]"], "evaluation.recall_depths=[0.0, 1.5]"),
    (["evaluation.recall_lengths=[100]"], "evaluation.recall_lengths=[100]"),
    (["evaluation.position_buckets=[4096, 1024]"], "evaluation.position_buckets"),
    (["evaluation.position_buckets=[8192]"], "evaluation.position_buckets"),
    (["evaluation.recall_template=instruct"], "evaluation.recall_template='instruct'"),
    (["evaluation.heldout_fraction=1.5"], "evaluation.heldout_fraction=1.5"),
    (["evaluation.recall_lengths=[4096, x]"], "evaluation.recall_lengths[1]: expected an integer"),
    (["evaluation.heldout_docs=0", "evaluation.recall_tasks=[]"], "nothing to evaluate"),
])
def test_bad_evaluation_settings_name_the_field(override, needle):
    with pytest.raises(ConfigError, match=None) as err:
        validate(load_config("examples/demo_cpu.yaml", override), 1)
    assert needle in str(err.value)
