"""PNG pictures of evaluation results (matplotlib: the optional `plots` extra).

- recall_heatmap: exact match, answer token accuracy and answer log-likelihood by length (rows)
  x depth (columns), a row of panels per metric, a column per task.
- history_chart: training loss (every step) beside validation loss (total and by position
  bucket), and recall exact match and token accuracy per task, against training steps.
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


# (cell key, panel title, colour bar label, colour range): exact match alone is all 0.00 for a small model,
# while token accuracy and the answer's log-likelihood still show what it learned.
HEATMAP_METRICS = (("exact_match", "exact match", "exact match", (0.0, 1.0)),
                   ("token_accuracy", "answer token accuracy", "token accuracy", (0.0, 1.0)),
                   ("mean_logprob", "answer log-likelihood per token", "nats / token", None))
COLOURS = "viridis"  # perceptually even, dark to light: the cell's text colour follows


def recall_heatmap(recall: dict, path: str, title: str = "recall") -> Optional[str]:
    """One row of panels per metric (exact match, answer token accuracy, log-likelihood), one
    column per task; each cell is a length x depth mean with its value written on it."""
    cells = recall.get("cells") or []
    if not cells or not matplotlib_available():
        return None
    plt = _pyplot()
    tasks = sorted({c["task"] for c in cells})
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    rows = len(HEATMAP_METRICS)
    fig, axes = plt.subplots(rows, len(tasks), squeeze=False, layout="constrained",
                             figsize=(2.0 + 1.1 * len(depths) * len(tasks),
                                      rows * (1.3 + 0.4 * len(lengths))))
    for r, (key, label, bar_label, limits) in enumerate(HEATMAP_METRICS):
        values = [c[key] for c in cells if _finite(c.get(key))]
        if limits is None:  # log-likelihood: from the worst cell up to 0 (certainty)
            low = min(values, default=-1.0)
            limits = (min(low, -1e-3), 0.0)
        for k, task in enumerate(tasks):
            ax = axes[r][k]
            grid = [[math.nan] * len(depths) for _ in lengths]
            for c in cells:
                if c["task"] == task and _finite(c.get(key)):
                    grid[lengths.index(c["length"])][depths.index(c["depth"])] = c[key]
            image = ax.imshow(grid, vmin=limits[0], vmax=limits[1], cmap=COLOURS, aspect="auto")
            for i, row in enumerate(grid):
                for j, value in enumerate(row):
                    if not math.isnan(value):
                        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                                color=_text_colour(image.cmap(image.norm(value))))
            ax.set_xticks(range(len(depths)), [f"{d:.2f}" for d in depths])
            ax.set_yticks(range(len(lengths)), [f"{n:,}" for n in lengths])
            if r == rows - 1:
                ax.set_xlabel("depth")
            if k == 0:
                ax.set_ylabel("length (tokens)")
            ax.set_title(f"{task}: {label}", fontsize=9)
        fig.colorbar(image, ax=axes[r].tolist(), label=bar_label, shrink=0.9)
    fig.suptitle(title)
    return _save(fig, plt, path)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _text_colour(rgba) -> str:
    """Black on light cells, white on dark ones (relative luminance)."""
    r, g, b = rgba[:3]
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"


def history_chart(records: list[dict], path: str, title: str = "evaluation",
                  train_loss: Optional[list[tuple[int, float]]] = None) -> Optional[str]:
    """records: eval records (report.eval_record) of several steps; train_loss: (step, loss)
    of the training steps (metrics.jsonl), drawn beside the validation loss."""
    records = sorted((r for r in records if r.get("step") is not None), key=lambda r: r["step"])
    if not records or not matplotlib_available():
        return None
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, layout="constrained")
    steps = [r["step"] for r in records]

    def series(get):
        return [get(r["eval"]) for r in records]

    if train_loss:
        last = steps[-1]
        shown = [(s, v) for s, v in sorted(train_loss) if s <= last and _finite(v)]
        if shown:
            top.plot([s for s, _ in shown], [v for _, v in shown], "-", color="tab:gray",
                     alpha=0.6, linewidth=1, label="training loss (each step)")
    if any("val_loss" in r["eval"] for r in records):
        top.plot(steps, series(lambda e: e.get("val_loss", math.nan)), "k-o",
                 label="validation loss")
        labels = {k for r in records for k in r["eval"].get("val_position_loss", {})}
        for label in sorted(labels, key=lambda s: int(s.split("-")[0].rstrip("K") or 0)):
            top.plot(steps, series(lambda e: e.get("val_position_loss", {}).get(label, math.nan)),
                     "--.", label=f"validation, positions {label}")
    if top.lines:
        top.legend(fontsize=7)
    top.set_ylabel("loss")
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
