"""ProLong in miniature (examples/miniature/run.sh) in its CI size: the plumbing, not the effect.
Every arm trains from the short checkpoint with its own RoPE base and length, every run is
evaluated at every length, and the table lists every arm x length; nothing goes to docs/."""
import json
import os
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMS = {  # arm -> (RoPE base, training length) that its run must have used
    "arm_a": (10_000, 4096), "arm_b": (500_000, 4096), "arm_c": (500_000, 4096),
    "arm_d": (1_000_000, 8192),
}
LABELS = ["pre-trained at 512", "a: 4K, RoPE base 10K", "b: 4K, base 500K",
          "c: 4K, base 500K, long data only", "d: 8K (2x eval)"]


@pytest.mark.slow
def test_ci_size_run_trains_every_arm_from_the_short_checkpoint_and_writes_the_table(tmp_path):
    out, docs = tmp_path / "run", tmp_path / "docs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
           "MINIATURE_SCALE": "ci", "MINIATURE_SEEDS": "1", "MINIATURE_OUT": str(out),
           "MINIATURE_DOCS": str(docs), "MINIATURE_CORPUS": str(tmp_path / "corpus")}
    docs_before = sorted(os.listdir(os.path.join(REPO, "docs")))
    proc = subprocess.run(["bash", "examples/miniature/run.sh"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seed = out / "seed1"

    short = yaml.safe_load((seed / "pretrain" / "config.yaml").read_text())
    assert (short["model"]["rotary_base"], short["training"]["seq_length"]) == (10_000, 512)
    checkpoints = seed / "pretrain" / "checkpoints"
    short_ckpt = os.path.realpath(checkpoints / (checkpoints / "latest").read_text().strip())
    for arm, (base, length) in ARMS.items():
        log = (seed / f"{arm}.log").read_text()
        loaded = [line for line in log.splitlines() if line.startswith("initialised weights")]
        assert len(loaded) == 1 and "LR schedule and data restart at step 0" in loaded[0], log
        assert os.path.realpath(loaded[0].split(" from ")[1].split(";")[0]) == short_ckpt
        assert "finished miniature_continue at step 2" in log, log[-2000:]
        cfg = yaml.safe_load((seed / arm / "config.yaml").read_text())
        assert (cfg["model"]["rotary_base"], cfg["training"]["seq_length"]) == (base, length)
        assert cfg["checkpoint"]["reset_schedule"] and cfg["checkpoint"]["load_optimizer"]
        # periodic evaluation ran inside the training run
        assert (seed / arm / "eval" / "step_00000002.json").exists()

    for run in ["short", *ARMS]:
        both = json.loads((seed / "eval" / run / "all" / "results.json").read_text())
        recall_docs = json.loads(
            (seed / "eval" / run / "recall_docs" / "results.json").read_text())
        lengths = {(ex["task"], ex["length"]) for r in (both, recall_docs)
                   for ex in r["examples"]}
        assert lengths == {("json_kv", n) for n in (512, 1024, 2048, 4096)} | {
            ("niah_mk", n) for n in (1024, 2048, 4096)}, run
        for res in (both, recall_docs):
            assert list(res["eval"]["val_position_loss"]) == ["0-512", "512-1K", "1K-2K",
                                                              "2K-4K"]
        assert set(both["eval"]["val_domain_loss"]) == {"code", "recall", "text"}
        assert set(recall_docs["eval"]["val_domain_loss"]) == {"recall"}

    table = (docs / "miniature.md").read_text()
    assert (docs / "miniature.png").stat().st_size > 10_000
    lengths = ["512", "1K", "2K", "4K"]
    for title, columns in [
            ("Validation loss by position, recall documents", ["0-512", "512-1K", "1K-2K",
                                                               "2K-4K"]),
            ("json_kv: answer mean log-likelihood", lengths),
            ("niah_mk: answer token accuracy / exact match",
             [f"{n} acc" for n in lengths] + [f"{n} EM" for n in lengths])]:
        section = table.split(f"**{title}")[1].split("**")[1]  # [0]: the rest of the title
        rows = [line for line in section.splitlines() if line.startswith("| ")]
        assert len(rows) == 1 + len(LABELS), section
        assert [c.strip() for c in rows[0].strip("|").split("|")] == ["run", *columns]
        for label in LABELS:
            row = next(r for r in rows if label in r)
            cells = [c.strip() for c in row.strip("|").split("|")[1:]]
            # a number in every cell but niah_mk at 512 (its fixed text alone is longer)
            assert [c == "n/a" for c in cells] == [
                "niah" in title and c.startswith("512") for c in columns], row
    assert sorted(os.listdir(os.path.join(REPO, "docs"))) == docs_before
