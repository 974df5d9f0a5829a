"""Every command-line tool answers bad input as README "Exit codes" promises: exit status 2 and
one `error:` line on stderr that names what the user gave (the path, the option, the field) and
what to do, with no traceback. One parametrized test over the tools and their bad inputs, run
in-process through each tool's main() (tests/tool_modules.py)."""
import json
import os
from dataclasses import dataclass, replace

import pytest

from tool_modules import load_tool


@dataclass(frozen=True)
class Case:
    id: str
    tool: str  # tools/NAME.py, or "train" (python -m megatron_prolong.train)
    argv: tuple  # "{name}" is a path from the `inputs` fixture
    says: tuple  # fragments the error line holds (formatted like argv)


CASES = [
    # convert.py: a directory of the other kind names the direction that takes it.
    Case("convert-hf-to-mcore-on-a-run", "convert",
         ("hf-to-mcore", "--hf-dir", "{run}", "--out", "{out}"),
         ("--hf-dir {run}: this is a training run", "mcore-to-hf --checkpoint {run}")),
    Case("convert-hf-to-mcore-missing", "convert",
         ("hf-to-mcore", "--hf-dir", "{missing}", "--out", "{out}"),
         ("--hf-dir {missing}: no such directory",)),
    Case("convert-hf-to-mcore-bad-config-json", "convert",
         ("hf-to-mcore", "--hf-dir", "{bad_json}", "--out", "{out}"),
         ("{bad_json}/config.json: not valid JSON",)),
    Case("convert-mcore-to-hf-on-an-hf-directory", "convert",
         ("mcore-to-hf", "--checkpoint", "{hf}", "--out", "{out}"),
         ("--checkpoint {hf}: this is a Hugging Face model directory",
          "hf-to-mcore --hf-dir {hf}")),
    Case("convert-mcore-to-hf-missing", "convert",
         ("mcore-to-hf", "--checkpoint", "{missing}", "--out", "{out}"),
         ("--checkpoint {missing}: no such directory",)),
    Case("convert-mcore-to-hf-on-something-else", "convert",
         ("mcore-to-hf", "--checkpoint", "{empty}", "--out", "{out}"),
         ("--checkpoint {empty}: not a megatron checkpoint", "hf-to-mcore")),
    # evaluate.py --hf: checked locally before transformers (or the hub) is asked.
    Case("evaluate-hf-missing", "evaluate", ("--hf", "{missing}", "--lengths", "512"),
         ("--hf {missing}: no such directory", "--local-dir")),
    Case("evaluate-hf-on-a-run", "evaluate", ("--hf", "{run}", "--lengths", "512"),
         ("--hf {run}: this is a training run", "--checkpoint {run}")),
    Case("evaluate-hf-without-weights", "evaluate",
         ("--hf", "{no_weights}", "--examples-file", "{examples}"),
         ("--hf {no_weights}: transformers cannot load it",)),
    Case("evaluate-hf-tokenizer-past-the-embedding", "evaluate",
         ("--hf", "{hf}", "--tokenizer", "byte", "--lengths", "512", "--tasks", "json_kv"),
         ("tokenizer byte has 512 ids", "only 300 embedding rows")),
    Case("evaluate-hf-no-tokenizer-files", "evaluate",
         ("--hf", "{hf}", "--lengths", "512", "--tasks", "json_kv"),
         ("--hf {hf}: no tokenizer.json", "--examples-file")),
    Case("evaluate-hf-example-ids-past-the-embedding", "evaluate",
         ("--hf", "{hf}", "--examples-file", "{examples_wide}"),
         ("{examples_wide}: example json_kv #0 holds token id 400", "300 rows")),
    Case("evaluate-checkpoint-on-an-hf-directory", "evaluate", ("--checkpoint", "{hf}",),
         ("--checkpoint {hf}: this is a Hugging Face model directory", "--hf {hf}")),
    Case("evaluate-checkpoint-missing", "evaluate", ("--checkpoint", "{missing}",),
         ("--checkpoint {missing}: no such directory",)),
    # Data tools.
    Case("preprocess-missing-input", "preprocess_data",
         ("--input", "{missing}", "--output-prefix", "{out}", "--tokenizer", "byte"),
         ("input files not found", "{missing}")),
    Case("merge-missing-dataset", "merge_datasets",
         ("--input", "{missing}", "--output-prefix", "{out}"),
         ("indexed dataset '{missing}'", "preprocess_data.py")),
    Case("inspect-unknown-field", "inspect_data", ("{bad_recipe}",),
         ("{bad_recipe}:2: training.seq_lenght: unknown field",)),
    Case("inspect-missing-recipe", "inspect_data", ("{missing}",),
         ("recipe '{missing}' does not exist",)),
    Case("import-mds-missing", "import_prolong_mds",
         ("--input", "{missing}", "--output-dir", "{out}"),
         ("{missing}: not a directory",)),
    Case("import-mds-not-mds", "import_prolong_mds",
         ("--input", "{hf}", "--output-dir", "{out}"),
         ("{hf}: no index.json", "not an MDS dataset")),
    # The training entry point.
    Case("train-unknown-field", "train", ("{bad_recipe}",),
         ("{bad_recipe}:2: training.seq_lenght: unknown field", "seq_length")),
    Case("train-missing-recipe", "train", ("{missing}",),
         ("recipe '{missing}' does not exist",)),
]

# ---------------------------------------------------------------------------------------------
# Cases other branches fix (added by the lead at merge time): i19-data's preprocess_data errors
# (a missing --text-key field, bad records, ...), i20-cli's train.py override errors. Append
# Case(...) entries here; they run through the same contract below.
# ---------------------------------------------------------------------------------------------
CASES_FROM_OTHER_BRANCHES: list = [
    # preprocess_data.py: a record without the field names the option that sets it; a line
    # nested too deeply for the JSON parser is a bad line, not a RecursionError.
    Case("preprocess-record-without-the-text-key", "preprocess_data",
         ("--input", "{no_text_key}", "--output-prefix", "{out}/p", "--tokenizer", "byte"),
         ("{no_text_key}:2", "no field 'text'", "--text-key")),
    Case("preprocess-json-nested-too-deeply", "preprocess_data",
         ("--input", "{deep_json}", "--output-prefix", "{out}/q", "--tokenizer", "byte"),
         ("{deep_json}:1", "nested too deeply")),
    # train.py overrides: the override is named (not the recipe) and the nearest field suggested.
    Case("train-override-unknown-field", "train",
         ("examples/demo_cpu.yaml", "training.train_step=10"),
         ("override training.train_step=10", "did you mean training.train_steps?")),
    Case("train-override-bad-value", "train",
         ("examples/demo_cpu.yaml", "training.train_steps=ten"),
         ("override training.train_steps=ten", "expected an integer")),
    Case("train-override-yaml-tag", "train",
         ("examples/demo_cpu.yaml", "training.seed=!!python/object/apply:os.getpid []"),
         ("override training.seed=", "tags such as !!python/object are not accepted")),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Paths the cases name: a tiny HF Llama export without tokenizer files (vocab 300), a
    training run's directory, recall examples (token ids) inside and outside its vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_prolong.data.tokenizer import build_tokenizer
    from megatron_prolong.evaluation.tasks import generate_examples, save_examples

    root = tmp_path_factory.mktemp("tool_errors")
    paths = {name: str(root / name) for name in
             ("hf", "run", "missing", "out", "bad_json", "no_weights", "empty")}
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=False, bos_token_id=256, eos_token_id=257)
    LlamaForCausalLM(cfg).save_pretrained(paths["hf"])
    os.makedirs(os.path.join(paths["run"], "checkpoints"))
    open(os.path.join(paths["run"], "config.yaml"), "w").close()
    for name in ("bad_json", "no_weights", "empty"):
        os.makedirs(paths[name])
    with open(os.path.join(paths["bad_json"], "config.json"), "w") as f:
        f.write("{not json")
    with open(os.path.join(paths["no_weights"], "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f)
    paths["bad_recipe"] = str(root / "bad.yaml")
    with open(paths["bad_recipe"], "w") as f:
        f.write("training:\n  seq_lenght: 128\n")
    examples = generate_examples(["json_kv"], build_tokenizer("byte"), [512], [0.0, 1.0], 1,
                                 seed=3)
    paths["examples"] = str(root / "examples.jsonl")
    save_examples(examples, paths["examples"])
    paths["examples_wide"] = str(root / "examples_wide.jsonl")
    first = examples[0]
    save_examples([replace(first, prompt_ids=first.prompt_ids[:-1] + [400])] + examples[1:],
                  paths["examples_wide"])
    paths["no_text_key"] = str(root / "no_text_key.jsonl")
    with open(paths["no_text_key"], "w") as f:
        f.write(json.dumps({"text": "a document"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    paths["deep_json"] = str(root / "deep.jsonl")
    with open(paths["deep_json"], "w") as f:
        f.write("[" * 200_000 + "]" * 200_000 + "\n")
    return paths


def _main(tool: str):
    if tool == "train":
        from megatron_prolong.train import main

        return main
    return load_tool(tool).main


@pytest.mark.parametrize("case", CASES + CASES_FROM_OTHER_BRANCHES, ids=lambda c: c.id)
def test_bad_input_exits_2_with_one_error_line(case, inputs, capsys):
    argv = [a.format(**inputs) for a in case.argv]
    try:
        code = _main(case.tool)(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for fragment in case.says:
        assert fragment.format(**inputs) in errors[0], (fragment, errors[0])


def test_hf_export_without_tokenizer_files_scores_an_examples_file(inputs, tmp_path, capsys):
    code = load_tool("evaluate").main(["--hf", inputs["hf"], "--examples-file",
                                       inputs["examples"], "--out", str(tmp_path), "--no-plots"])
    assert code == 0, capsys.readouterr().err
    with open(tmp_path / "results.json") as f:
        scored = json.load(f)["examples"]
    assert len(scored) == 2 and all(r["mean_logprob"] < 0 for r in scored)


def test_hf_loads_never_ask_the_hub(inputs, tmp_path, monkeypatch):
    """A local directory is loaded with local_files_only (and HF_HUB_OFFLINE): no request."""
    import transformers

    seen = {}
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs, offline=os.environ.get("HF_HUB_OFFLINE"))
        return original(*args, **kwargs)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    code = load_tool("evaluate").main(["--hf", inputs["hf"], "--examples-file",
                                       inputs["examples"], "--out", str(tmp_path), "--no-plots"])
    assert code == 0
    assert seen["local_files_only"] is True and seen["offline"] == "1"
