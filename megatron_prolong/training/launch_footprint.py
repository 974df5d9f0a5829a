"""What a launch creates before its first step, so that a launch refused at start-up (exit 2)
leaves nothing behind: not a run directory holding only config.yaml and run.lock that looks like
a run, nor a half-built demo corpus.

`LaunchFootprint.take(cfg)` runs on rank 0 before anything is written and records, for each
folder the launch may create (run_dir, its checkpoints/, tensorboard/, eval/ and demo corpus,
or where the config puts them), the outermost one that does not exist yet, and which of
run_dir's own files (config.yaml, run.lock, metrics.jsonl) are already there.
`remove_created()` deletes exactly those new folders and files and puts back the text of a
config.yaml the launch rewrote: what an earlier run left is never touched, and nothing at all
is undone once this launch logged a step or saved a checkpoint. Standard library only.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Optional

from megatron_prolong.atomic_file import write_text_atomically
from megatron_prolong.config import RunConfig

RUN_DIR_FILES = ("config.yaml", "run.lock", "metrics.jsonl")


def _outermost_missing(path: str) -> Optional[str]:
    """The outermost folder of `path` (itself included) that does not exist, or None."""
    path = os.path.abspath(path)
    missing = None
    while not os.path.lexists(path):
        missing, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _stat(path: str) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


@dataclass
class LaunchFootprint:
    new_dirs: list[str] = field(default_factory=list)
    new_files: list[str] = field(default_factory=list)
    replaced_files: dict[str, str] = field(default_factory=dict)  # path -> its text before
    progress_files: dict[str, Optional[tuple[int, int]]] = field(default_factory=dict)

    @classmethod
    def take(cls, cfg: RunConfig) -> "LaunchFootprint":
        run_dir = cfg.run_dir
        save_dir = cfg.checkpoint.save_dir or os.path.join(run_dir, "checkpoints")
        tensorboard = cfg.logging.tensorboard_dir or os.path.join(run_dir, "tensorboard")
        dirs = [run_dir, save_dir, tensorboard, os.path.join(run_dir, "eval")]
        if cfg.data.kind == "demo":
            dirs.append(cfg.data.options.get("corpus_dir") or os.path.join(run_dir, "demo_corpus"))
        new_dirs = {m for m in (_outermost_missing(d) for d in dirs) if m}
        footprint = cls(new_dirs=sorted(new_dirs))
        if os.path.isdir(run_dir):
            for name in RUN_DIR_FILES:
                path = os.path.join(run_dir, name)
                if not os.path.lexists(path):
                    footprint.new_files.append(path)
                elif name == "config.yaml":  # rewritten by every launch
                    try:
                        with open(path) as f:
                            footprint.replaced_files[path] = f.read()
                    except (OSError, UnicodeDecodeError):
                        pass
        # A step logged or a checkpoint saved by this launch: the run has started, keep it all.
        for path in (os.path.join(run_dir, "metrics.jsonl"), os.path.join(save_dir, "latest")):
            footprint.progress_files[path] = _stat(path)
        return footprint

    def trained(self) -> bool:
        """Whether this launch logged a step or saved a checkpoint."""
        return any(_stat(p) != before and (_stat(p) or (0,))[0] > 0
                   for p, before in self.progress_files.items())

    def remove_created(self) -> bool:
        """Undo this launch's writes unless it trained (then nothing is touched); True when
        undone. Call only when the launch owned the run directory: one refused because another
        launch holds it must not touch what that one writes."""
        if self.trained():
            return False
        for path in self.new_dirs:
            shutil.rmtree(path, ignore_errors=True)
        for path in self.new_files:
            if os.path.lexists(path):
                os.remove(path)
        for path, text in self.replaced_files.items():
            write_text_atomically(path, text)
        return True
