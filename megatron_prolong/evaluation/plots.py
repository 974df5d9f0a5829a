"""PNG pictures of evaluation results (matplotlib: the optional `plots` extra).

- recall_heatmap: exact match by length (rows) x depth (columns), one panel per task.
- history_chart: validation loss (total and by position bucket) and recall exact match per
  task against training steps.
Without matplotlib both return None and the caller says so once.
"""
from __future__ import annotations

import math
import os
from typing import Optional


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def recall_heatmap(recall: dict, path: str, title: str = "recall") -> Optional[str]:
    cells = recall.get("cells") or []
    if not cells or not matplotlib_available():
        return None
    plt = _pyplot()
    tasks = sorted({c["task"] for c in cells})
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    fig, axes = plt.subplots(1, len(tasks), figsize=(1.5 + 1.2 * len(depths) * len(tasks),
                                                      1.8 + 0.5 * len(lengths)), squeeze=False,
                             layout="constrained")
    for k, (ax, task) in enumerate(zip(axes[0], tasks)):
        grid = [[math.nan] * len(depths) for _ in lengths]
        for c in cells:
            if c["task"] == task:
                grid[lengths.index(c["length"])][depths.index(c["depth"])] = c["exact_match"]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(depths)), [f"{d:.2f}" for d in depths])
        ax.set_yticks(range(len(lengths)), [f"{n:,}" for n in lengths])
        ax.set_xlabel("depth")
        if k == 0:
            ax.set_ylabel("length (tokens)")
        ax.set_title(task)
    fig.colorbar(image, ax=axes[0].tolist(), label="exact match")
    fig.suptitle(title)
    return _save(fig, plt, path)


def history_chart(records: list[dict], path: str, title: str = "evaluation") -> Optional[str]:
    """records: eval records (report.eval_record) of several steps."""
    records = sorted((r for r in records if r.get("step") is not None), key=lambda r: r["step"])
    if not records or not matplotlib_available():
        return None
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, layout="constrained")
    steps = [r["step"] for r in records]

    def series(get):
        return [get(r["eval"]) for r in records]

    if any("val_loss" in r["eval"] for r in records):
        top.plot(steps, series(lambda e: e.get("val_loss", math.nan)), "k-o", label="all")
        labels = {k for r in records for k in r["eval"].get("val_position_loss", {})}
        for label in sorted(labels, key=lambda s: int(s.split("-")[0].rstrip("K") or 0)):
            top.plot(steps, series(lambda e: e.get("val_position_loss", {}).get(label, math.nan)),
                     "--.", label=f"positions {label}")
        top.legend(fontsize=7)
    top.set_ylabel("validation loss")
    tasks = sorted({t for r in records for t in (r["eval"].get("recall") or {}).get("tasks", {})})
    for task in tasks:
        bottom.plot(steps, series(lambda e: e["recall"]["tasks"].get(task, {}).get(
            "exact_match", math.nan)), "-o", label=f"{task} exact match")
        bottom.plot(steps, series(lambda e: e["recall"]["tasks"].get(task, {}).get(
            "token_accuracy", math.nan)), ":.", label=f"{task} token accuracy")
    if tasks:
        bottom.legend(fontsize=7)
    bottom.set_ylim(-0.02, 1.02)
    bottom.set_ylabel("recall")
    bottom.set_xlabel("training step")
    fig.suptitle(title)
    return _save(fig, plt, path)


def _save(fig, plt, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
