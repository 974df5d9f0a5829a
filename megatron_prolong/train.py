"""Training entry point.

    python -m megatron_prolong.train RECIPE.yaml [key=value ...]            # 1 process (CPU ok)
    torchrun --nproc-per-node 4 -m megatron_prolong.train RECIPE.yaml parallel.tensor=2 ...
    python -m megatron_prolong.train RECIPE.yaml --dry-run --nodes 8 --gpus-per-node 8 --gpu h100

Exit codes: 0 done / saved and stopped on preemption, 2 configuration or input error (one
`error:` line naming the field, file or checkpoint: bad values, a run directory another launch
owns, a checkpoint of another model shape, unreadable data or token ids outside the
vocabulary), 3 diverged (training.max_nan_steps skipped steps in a row), 4 the dry run says the
recipe does not fit the GPU.

Before torch and megatron-core are imported (a fraction of a second), and before anything is
written: the recipe and its overrides (an error names the override, or the recipe's FILE:LINE,
and the nearest field name), the layout rules, and the inputs the recipe points at
(training/input_checks.py). A launch refused later at start-up removes what it created
(training/launch_footprint.py).

Preemption (SIGTERM/SIGUSR1) is honoured from the start of `main`, before torch and
megatron-core are imported: a signal during start-up stops the run before its first step
(nothing to save), one during training after the current step with a checkpoint; both exit 0
and leave RUN_DIR/preempted for the launcher (slurm/common.sh requeues on it). Ctrl-C (SIGINT)
once does the same; twice aborts at once without saving.
"""
from __future__ import annotations

# First, and light (standard library only): the preemption flag is installed before anything
# heavy is imported.
from megatron_prolong.training.preemption import PreemptionFlag  # isort: skip

import argparse
import os
import sys
from typing import Optional

from megatron_prolong.config import ConfigError, load_config

EXAMPLES = """examples:
  python -m megatron_prolong.train examples/demo_cpu.yaml                  # the CPU demo
  python -m megatron_prolong.train examples/demo_cpu.yaml training.train_steps=10 run_dir=runs/try
  python -m megatron_prolong.train examples/stage1_64k.yaml --dry-run --nodes 8
recipes: examples/*.yaml; fields and exit codes: README.md, docs/training.md"""


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_prolong.train",
        description="Train (or dry-run) a recipe: RECIPE.yaml followed by section.field=value "
                    "overrides.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="*", metavar="RECIPE.yaml | key=value")
    parser.add_argument("--dry-run", action="store_true",
                        help="print layout, budget and per-GPU memory estimate; no training")
    parser.add_argument("--nodes", type=int, default=1,
                        help="dry run: number of nodes to plan for (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8,
                        help="dry run: GPUs per node (default 8); world size = nodes x this")
    parser.add_argument("--gpu", default="h100", help="dry run: h100 (80 GB) or h200 (141 GB)")
    ns = parser.parse_intermixed_args(argv)
    recipes = [a for a in ns.args if "=" not in a]
    if len(recipes) > 1:
        parser.error(f"more than one recipe given: {recipes}")
    if not recipes:  # argparse's usage line and exit 2, instead of training built-in defaults
        parser.error("a recipe is required (e.g. examples/demo_cpu.yaml)")
    ns.recipe = recipes[0]
    ns.overrides = [a for a in ns.args if "=" in a]
    return ns


def main(argv: Optional[list[str]] = None) -> int:
    with PreemptionFlag() as preemption:
        return _main(argv, preemption)


def _main(argv: Optional[list[str]], preemption: PreemptionFlag) -> int:
    ns = parse_args(argv)
    # Everything up to the heavy imports reads only the recipe and the file system: a bad
    # field, override or input fails at once, before torch and megatron-core load (seconds)
    # and before anything is written.
    try:
        cfg = load_config(ns.recipe, ns.overrides)
        if ns.dry_run:
            from megatron_prolong.training.dry_run import dry_run_report

            report, fits = dry_run_report(cfg, ns.nodes, ns.gpus_per_node, ns.gpu)
            print(report)
            return 0 if fits else 4
        from megatron_prolong.config import validate
        from megatron_prolong.training.input_checks import check_inputs

        # The world size the launcher (torchrun, srun) set, as init_distributed reads it.
        layout = validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        check_inputs(cfg)
        from megatron_prolong.training.limits import check_start_up_limits

        check_start_up_limits(cfg, layout)  # this machine: before anything is allocated
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return _launch(cfg, layout, preemption)


def _launch(cfg, layout, preemption: PreemptionFlag) -> int:
    from megatron_prolong.training.launch_footprint import LaunchFootprint

    try:
        from megatron_prolong.training.loop import TrainingDiverged, train
        from megatron_prolong.training.parallel import (
            destroy_model_parallel,
            init_distributed,
            init_model_parallel,
        )

        runtime = init_distributed(cfg.training.device)
        init_model_parallel(layout, cfg.training.seed)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from megatron_prolong.data.indexed import DataFileError
    from megatron_prolong.training.run_lock import RunDirBusy
    from megatron_prolong.training.checkpoint import CheckpointOutOfSpace

    footprint = LaunchFootprint.take(cfg) if runtime.rank == 0 else None
    try:
        train(cfg, runtime, layout, preemption=preemption)
    except (ConfigError, DataFileError) as exc:  # run dir, checkpoints, data: after start-up
        # Errors every rank found together are printed once; the launcher (torchrun, srun
        # --kill-on-bad-exit) stops the other ranks when one rank alone exits.
        if runtime.rank == 0 or not getattr(exc, "all_ranks", False):
            print(f"error: {exc}", file=sys.stderr)
        if footprint is not None and not isinstance(exc, RunDirBusy):
            footprint.remove_created()  # the run directory is this launch's: undo its writes
        return 2
    except TrainingDiverged as exc:  # every rank sees the same losses and norms
        if runtime.rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 3
    except CheckpointOutOfSpace as exc:  # every rank's save failed; 75: Slurm requeues
        if runtime.rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        destroy_model_parallel()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # the guard is required: the async checkpoint writer spawns
    sys.exit(main())
