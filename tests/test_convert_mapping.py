"""The Llama mapping table, config mapping, HF file I/O and the converter's refusals (one process,
no megatron model needed except for the local-spec name check)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_prolong.config import ModelConfig
from megatron_prolong.convert import ConversionError
from megatron_prolong.convert import llama_mapping as lm
from megatron_prolong.convert.hf_config import hf_config_from_model, model_config_from_hf
from megatron_prolong.convert.hf_io import (HFCheckpoint, PlannedTensor, parse_size, plan_shards,
                                            read_safetensors_header, write_sharded)
from megatron_prolong.convert.hf_to_mcore import hf_to_mcore
from megatron_prolong.convert.rope import STALE_ROPE_KEYS

from test_convert_parity import hf_rope_theta, tiny_hf_model, transformers_major
from tool_modules import load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODEL = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=8,
                    num_query_groups=2, vocab_size=256, rotary_base=8e6)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("hf"))
    tiny_hf_model(directory)
    return directory


def copy_dir(src, tmp_path, name="copy"):
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------------------------- table
def test_qkv_is_interleaved_per_query_group_and_inverts():
    d, h = MODEL.kv_channels, MODEL.hidden_size
    q = torch.arange(8 * d).repeat_interleave(h).reshape(8 * d, h).float()  # row r holds r
    k, v = q[: 2 * d] + 1000, q[: 2 * d] + 2000
    rule = next(r for r in lm.LLAMA_RULES if r.kind is lm.Kind.QKV)
    qkv = lm.to_mcore(rule, [q, k, v], MODEL)
    rows = qkv[:, 0]
    per_group = 4 * d + 2 * d
    # group 1 = query heads 4..7, then its key head, then its value head
    assert torch.equal(rows[per_group:per_group + 4 * d], torch.arange(4 * d, 8 * d).float())
    assert torch.equal(rows[per_group + 4 * d:per_group + 5 * d], torch.arange(d, 2 * d).float() + 1000)
    assert torch.equal(rows[per_group + 5 * d:2 * per_group], torch.arange(d, 2 * d).float() + 2000)
    back = lm.to_hf(rule, qkv, MODEL)
    assert all(torch.equal(a, b) for a, b in zip(back, [q, k, v]))
    assert all(t.is_contiguous() for t in back)


def test_fc1_is_gate_then_up():
    rule = next(r for r in lm.LLAMA_RULES if r.kind is lm.Kind.GATE_UP)
    gate, up = torch.randn(160, 64), torch.randn(160, 64)
    fc1 = lm.to_mcore(rule, [gate, up], MODEL)
    assert torch.equal(fc1[:160], gate) and torch.equal(fc1[160:], up)
    assert lm.mcore_shape(rule, MODEL) == (320, 64)


def test_table_covers_every_hf_llama_tensor_with_its_shape():
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(**hf_config_from_model(MODEL, torch.float32)))
    want = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    got = {}
    for unit in lm.units(MODEL):
        got.update(zip(unit.hf_names(), lm.hf_shapes(unit.rule, MODEL)))
    assert got == want
    assert list(got)[0] == "model.embed_tokens.weight" and list(got)[-1] == "lm_head.weight"


def test_te_names_are_the_checkpoint_keys_and_local_names_rename_the_norms():
    unit = lm.Unit(next(r for r in lm.LLAMA_RULES if r.hf == ("input_layernorm.weight",)), 3)
    assert unit.module_name("te") == "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    assert unit.module_name("local") == "decoder.layers.3.input_layernorm.weight"
    assert unit.checkpoint_key == "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
    fc1_norm = lm.Unit(next(r for r in lm.LLAMA_RULES if r.hf == ("post_attention_layernorm.weight",)), 0)
    assert fc1_norm.module_name("local") == "decoder.layers.0.pre_mlp_layernorm.weight"
    te_names = {u.module_name("te") for u in lm.units(MODEL)}
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in te_names
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in te_names)
    with pytest.raises(ConversionError, match="unknown layer spec"):
        unit.module_name("apex")


@pytest.mark.slow
def test_table_and_streamed_checkpoint_match_megatron(tmp_path):
    """Against a real local-spec GPTModel: its parameter names and checkpoint keys/shapes are the
    table's, and the converter's streamed checkpoint has exactly the entries save_model_weights
    writes, with the model's values."""
    from distributed import run_distributed

    (names, keys, ours, theirs, equal), = run_distributed(_against_megatron, 1, MODEL, str(tmp_path))
    assert names == {u.module_name("local") for u in lm.units(MODEL)}
    assert keys == {lm.Unit(r, 0).checkpoint_key: lm.checkpoint_shape(r, MODEL) for r in lm.LLAMA_RULES}
    assert ours == theirs and any(k.endswith("_extra_state/shard_1_2") for k in ours)
    assert equal


def _against_megatron(model, tmp):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_prolong.config import ParallelConfig
    from megatron_prolong.convert.mcore_io import (read_regions, save_mcore_checkpoint,
                                                   single_process_model_parallel)
    from megatron_prolong.model.llama import build_llama
    from megatron_prolong.training.weights import save_model_weights

    single_process_model_parallel()
    gpt = build_llama(model, ParallelConfig(), on_cpu=True, use_te=False)
    state = gpt.state_dict()
    names = {k for k in state if not k.endswith("_extra_state")}
    keys = {}
    for v in gpt.sharded_state_dict().values():
        if isinstance(v, ShardedTensor):
            keys[v.key] = tuple(v.global_shape)
        elif isinstance(v, ShardedTensorFactory):
            keys[v.key] = (model.num_layers, *v.data.shape)

    save_model_weights([gpt], os.path.join(tmp, "theirs"))
    save_mcore_checkpoint(model, torch.float32, lambda unit: state[unit.module_name("local")],
                          os.path.join(tmp, "ours"))

    def entries(d):
        md = FileSystemReader(os.path.join(tmp, d)).read_metadata().state_dict_metadata
        return {k: (type(v).__name__, tuple(getattr(v, "size", ()))) for k, v in md.items()}

    units = lm.units(model)
    regions = read_regions(os.path.join(tmp, "ours"), [
        (u.checkpoint_key, u.layer, lm.mcore_shape(u.rule, model), torch.float32) for u in units])
    equal = all(torch.equal(r, state[u.module_name("local")]) for u, r in zip(units, regions))
    return names, keys, entries("ours"), entries("theirs"), equal


def save_bin_shards(model, directory: str, per_shard: int = 8) -> None:
    """The sharded PyTorch .bin layout that transformers 4 writes (and 5 still reads):
    pytorch_model-0000i-of-0000n.bin + pytorch_model.bin.index.json."""
    state = model.state_dict()
    names = list(state)
    chunks = [names[i:i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for i, chunk in enumerate(chunks):
        file = f"pytorch_model-{i + 1:05d}-of-{len(chunks):05d}.bin"
        torch.save({n: state[n].contiguous() for n in chunk}, os.path.join(directory, file))
        weight_map.update(dict.fromkeys(chunk, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    model.config.save_pretrained(directory)


@pytest.mark.parametrize("writer", ["layout", "save_pretrained"])
def test_bin_checkpoints_read_like_safetensors(hf_dir, tmp_path, writer):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir)
    if writer == "save_pretrained":
        if transformers_major() >= 5:
            pytest.skip("transformers 5 writes no .bin checkpoints (the layout case covers reading them)")
        model.save_pretrained(str(tmp_path), safe_serialization=False, max_shard_size="200KB")
    else:
        save_bin_shards(model, str(tmp_path))
        # transformers itself reads this layout back to the same weights
        again = LlamaForCausalLM.from_pretrained(str(tmp_path))
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                     again.state_dict().values()))
    assert os.path.exists(tmp_path / "pytorch_model.bin.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".bin")]) > 1
    safe, binary = HFCheckpoint(hf_dir), HFCheckpoint(str(tmp_path))
    assert safe.tensors.keys() == binary.tensors.keys()
    for name in safe.tensors:
        assert torch.equal(safe.get(name), binary.get(name)), name


# --------------------------------------------------------------------------------------------- config
def test_config_round_trip_and_overrides():
    hf = hf_config_from_model(MODEL, torch.bfloat16, template={"bos_token_id": 128000, "dtype": "x"})
    assert hf["rope_theta"] == 8e6 and hf["torch_dtype"] == "bfloat16" and hf["bos_token_id"] == 128000
    assert "dtype" not in hf and hf["tie_word_embeddings"] is False
    assert model_config_from_hf(hf) == MODEL
    m = model_config_from_hf(hf, rope_theta=1.28e8, max_position_embeddings=524288)
    assert m.rotary_base == 1.28e8 and m.max_position_embeddings == 524288


@pytest.mark.parametrize("patch, needle", [
    ({"attention_bias": True}, "attention_bias=true"),
    ({"mlp_bias": True}, "mlp_bias=true"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings=true"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling is not supported"),
    ({"sliding_window": 4096}, "sliding-window"),
    ({"model_type": "mistral"}, "only 'llama'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"head_dim": 16}, "head_dim=16"),
])
def test_config_refusals(patch, needle):
    hf = {**hf_config_from_model(MODEL, torch.float32), **patch}
    with pytest.raises(ConversionError, match="cannot convert") as err:
        model_config_from_hf(hf)
    assert needle in str(err.value)


# --------------------------------------------------------------------------------------------- RoPE
LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def rope_config(layout: str, theta, scaling=None, **extra) -> dict:
    """MODEL's config.json with its RoPE settings in one layout: "top-level" (transformers 4 and
    the hub: rope_theta + rope_scaling) or "rope_parameters" (transformers 5)."""
    hf = hf_config_from_model(MODEL, torch.float32)
    for key in STALE_ROPE_KEYS:
        hf.pop(key, None)
    if layout == "top-level":
        hf.update(rope_theta=theta, rope_scaling=scaling)
    else:
        hf["rope_parameters"] = {"rope_theta": theta, "rope_type": "default", **(scaling or {})}
    hf.update(extra)
    return hf


LAYOUTS = ["top-level", "rope_parameters"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rope_base_read_from_either_layout(layout):
    assert model_config_from_hf(rope_config(layout, 5e5)).rotary_base == 5e5
    assert model_config_from_hf(rope_config(layout, 5e5), rope_theta=8e6).rotary_base == 8e6


def test_rope_base_of_configs_transformers_writes():
    """Whatever layout the installed transformers writes (4: top-level, 5: rope_parameters)."""
    from transformers import LlamaConfig

    written = LlamaConfig(**{**rope_config("top-level", 5e5), "rope_scaling": None}).to_dict()
    assert model_config_from_hf(written).rotary_base == 5e5
    scaled = LlamaConfig(**{**rope_config("top-level", 5e5), "max_position_embeddings": 131072,
                            "rope_scaling": dict(LLAMA31_SCALING)}).to_dict()
    with pytest.raises(ConversionError, match="RoPE scaling is not supported"):
        model_config_from_hf(scaled)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scaling", [LLAMA31_SCALING, {"rope_type": "yarn", "factor": 4.0},
                                     {"rope_type": "linear", "factor": 2.0},
                                     {"type": "dynamic", "factor": 2.0}])
def test_rope_scaling_refused_in_either_layout(layout, scaling):
    key = "rope_scaling" if layout == "top-level" else "rope_parameters"
    kind = scaling.get("rope_type") or scaling["type"]
    hf = rope_config(layout, 5e5, scaling)
    if layout == "rope_parameters" and "type" in scaling:
        hf["rope_parameters"].pop("rope_type")  # a legacy `type` key alone
    for override in (None, 8e6):  # --rope-theta does not make scaling acceptable
        with pytest.raises(ConversionError, match="RoPE scaling is not supported") as err:
            model_config_from_hf(hf, rope_theta=override)
        assert f"{key}." in str(err.value) and repr(kind) in str(err.value)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", ["theta", "type", "field", "mapping"])
def test_uninterpretable_rope_settings_name_the_key(layout, case):
    prefix = "" if layout == "top-level" else "rope_parameters."
    if case == "theta":
        hf, needle = rope_config(layout, "500k"), f"{prefix}rope_theta='500k'"
    elif case == "type":
        hf = rope_config(layout, 5e5, {"rope_type": "spiral"})
        needle = f"{'rope_scaling' if layout == 'top-level' else 'rope_parameters'}.rope_type='spiral'"
    elif case == "field":
        hf = rope_config(layout, 5e5, {"rope_type": "default", "beta": 3})
        needle = f"{'rope_scaling' if layout == 'top-level' else 'rope_parameters'}.beta=3"
    else:
        key = "rope_scaling" if layout == "top-level" else "rope_parameters"
        hf, needle = {**rope_config(layout, 5e5), key: "llama3"}, f"{key}='llama3'"
    with pytest.raises(ConversionError, match="cannot interpret") as err:
        model_config_from_hf(hf)
    assert needle in str(err.value)


def test_conflicting_rope_bases_refused_unless_overridden():
    hf = {**rope_config("rope_parameters", 8e6), "rope_theta": 1.28e8}
    with pytest.raises(ConversionError, match="different RoPE bases"):
        model_config_from_hf(hf)
    assert model_config_from_hf(hf, rope_theta=1.28e8).rotary_base == 1.28e8
    agreeing = {**rope_config("rope_parameters", 8e6), "rope_theta": 8e6}
    assert model_config_from_hf(agreeing).rotary_base == 8e6


def test_exported_config_states_one_base():
    stale = rope_config("rope_parameters", 8e6)
    cfg = hf_config_from_model(dataclasses.replace(MODEL, rotary_base=1.28e8), torch.float32, stale)
    assert cfg["rope_theta"] == 1.28e8 and cfg["rope_scaling"] is None
    assert "rope_parameters" not in cfg
    assert model_config_from_hf(cfg).rotary_base == 1.28e8


def load_cli():
    return load_tool("convert")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cli_refuses_scaled_rope_with_one_line(hf_dir, tmp_path, capsys, layout):
    d = copy_dir(hf_dir, tmp_path)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(rope_config(layout, 5e5, LLAMA31_SCALING), f)
    rc = load_cli().main(["hf-to-mcore", "--hf-dir", d, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert "'llama3'" in err and "RoPE scaling is not supported" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_export_after_rope_theta_override_reads_back_in_transformers(hf_dir, tmp_path):
    """The issue's case: a source config in transformers 5's layout (rope_parameters at 8e6),
    converted with --rope-theta 1.28e8 and exported: transformers reads 1.28e8, in its config and
    in the model's rotary frequencies."""
    from transformers import LlamaForCausalLM

    src = copy_dir(hf_dir, tmp_path, "src")
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump({**rope_config("rope_parameters", 8e6), "bos_token_id": 1, "eos_token_id": 2}, f)
    mcore, export = str(tmp_path / "mcore"), str(tmp_path / "export")
    for args in (["hf-to-mcore", "--hf-dir", src, "--out", mcore, "--rope-theta", "1.28e8"],
                 ["mcore-to-hf", "--checkpoint", mcore, "--out", export]):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert.py"), *args],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rope base 1.28e+08" in proc.stdout or "rope_theta 1.28e+08" in proc.stdout
    model = LlamaForCausalLM.from_pretrained(export)
    assert hf_rope_theta(model.config) == 1.28e8
    d = MODEL.kv_channels
    expected = 1.0 / (1.28e8 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    inv_freq = model.model.rotary_emb.inv_freq.double()
    assert torch.allclose(inv_freq, expected, rtol=1e-6), (inv_freq, expected)


# --------------------------------------------------------------------------------------------- files
def test_streamed_safetensors_shards_read_back(tmp_path):
    from safetensors.torch import load_file

    tensors = {"a": torch.randn(3, 5).bfloat16(), "b": torch.randn(7), "c": torch.randn(2, 2).half()}
    groups = [[PlannedTensor(n, t.dtype, tuple(t.shape))] for n, t in tensors.items()]
    shards = plan_shards(groups, max_bytes=40)
    assert [[t.name for t in s] for s in shards] == [["a"], ["b", "c"]]  # 30 B | 28 + 8 B
    write_sharded(str(tmp_path), shards, tensors.items())
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert index["weight_map"] == {"a": "model-00001-of-00002.safetensors",
                                   "b": "model-00002-of-00002.safetensors",
                                   "c": "model-00002-of-00002.safetensors"}
    assert index["metadata"]["total_size"] == 30 + 28 + 8
    for name, file in index["weight_map"].items():
        assert torch.equal(load_file(str(tmp_path / file))[name], tensors[name])
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20
    with pytest.raises(ConversionError, match="shard size"):
        parse_size("lots")


def test_stream_writer_refuses_out_of_plan_tensors(tmp_path):
    shards = [[PlannedTensor("a", torch.float32, (2,))]]
    with pytest.raises(ConversionError, match="expected a"):
        write_sharded(str(tmp_path), shards, [("a", torch.zeros(3))])
    assert os.listdir(tmp_path) == []  # neither the half-written shard nor an index


def _shard_of(directory, name):
    return json.load(open(os.path.join(directory, "model.safetensors.index.json")))["weight_map"][name]


def test_truncated_shard_is_refused(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path)
    path = os.path.join(d, _shard_of(d, "lm_head.weight"))
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(ConversionError, match="truncated"):
        read_safetensors_header(path)
    with pytest.raises(ConversionError, match="download the shard again"):
        hf_to_mcore(d, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_missing_shard_is_refused(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path)
    os.remove(os.path.join(d, _shard_of(d, "model.norm.weight")))
    with pytest.raises(ConversionError, match="shards missing"):
        HFCheckpoint(d)


def _rewrite(directory, name, fn):
    from safetensors.torch import load_file, save_file

    file = os.path.join(directory, _shard_of(directory, name))
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    index_path = os.path.join(directory, "model.safetensors.index.json")
    index = json.load(open(index_path))
    for n in tensors:
        index["weight_map"][n] = os.path.basename(file)
    json.dump(index, open(index_path, "w"))


@pytest.mark.parametrize("case, needle", [
    ("bias", "model.layers.0.self_attn.q_proj.bias: biases are not supported"),
    ("shape", "model.norm.weight: shape [63], config.json implies [64]"),
    ("dtype", "mixed dtypes"),
    ("missing", "missing tensors ['model.layers.1.mlp.up_proj.weight']"),
])
def test_tensor_refusals(hf_dir, tmp_path, case, needle):
    d = copy_dir(hf_dir, tmp_path)
    if case == "bias":
        _rewrite(d, "model.layers.0.self_attn.q_proj.weight",
                 lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.bias", torch.zeros(64)))
    elif case == "shape":
        _rewrite(d, "model.norm.weight", lambda t: t.__setitem__("model.norm.weight", torch.ones(63)))
    elif case == "dtype":
        name = "model.layers.0.mlp.down_proj.weight"
        _rewrite(d, name, lambda t: t.__setitem__(name, t[name].bfloat16()))
    else:
        name = "model.layers.1.mlp.up_proj.weight"
        file = os.path.join(d, _shard_of(d, name))
        _rewrite(d, name, lambda t: t.pop(name))
        index_path = os.path.join(d, "model.safetensors.index.json")
        index = json.load(open(index_path))
        index["weight_map"].pop(name)
        json.dump(index, open(index_path, "w"))
        assert os.path.exists(file)
    with pytest.raises(ConversionError) as err:
        hf_to_mcore(d, str(tmp_path / "out"))
    assert needle in str(err.value)


def test_target_layout_refused_and_cli_exits_nonzero(hf_dir, tmp_path, capsys):
    cli = load_cli()
    rc = cli.main(["hf-to-mcore", "--hf-dir", hf_dir, "--out", str(tmp_path / "o"), "--target-tp", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: target layout TP=4" in err and "num_query_groups=2" in err
    rc = cli.main(["mcore-to-hf", "--checkpoint", hf_dir, "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err  # an HF directory: the direction that takes it is named
    assert rc == 2 and "this is a Hugging Face model directory" in err and "hf-to-mcore" in err
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["mcore-to-hf"].format_help()
    for option in ("--checkpoint", "--model-config", "--rope-theta", "--tokenizer-dir", "--max-shard-size"):
        assert option in help_text
