"""The evaluation pictures: the recall heat map shows token accuracy and log-likelihood beside
exact match (at small scale exact match alone is all zeros) with cell text readable on its
colour; history.png draws the training loss beside the validation loss."""
import json
import math

import pytest

from megatron_prolong.evaluation import plots
from megatron_prolong.evaluation.session import read_training_loss, write_results

pytest.importorskip("matplotlib")


def _capture(monkeypatch):
    """The figure a plot function saves, instead of the PNG."""
    figures = []

    def keep(fig, plt, path):
        figures.append(fig)
        return path
    monkeypatch.setattr(plots, "_save", keep)
    return figures


def _luminance(rgba):
    r, g, b = rgba[:3]
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _cells():
    return [dict(task=t, length=n, depth=d, exact_match=0.0, token_accuracy=acc,
                 mean_logprob=-3.5 * (1 - acc), examples=1)
            for t in ("json_kv", "niah_mk") for n in (512, 1024)
            for d, acc in ((0.0, 0.1), (0.5, 0.55), (1.0, 0.95))]


def test_recall_heatmap_shows_every_metric_with_readable_numbers(monkeypatch):
    from matplotlib.colors import to_rgba

    figures = _capture(monkeypatch)
    plots.recall_heatmap({"cells": _cells()}, "unused.png")
    (fig,) = figures
    panels = [ax for ax in fig.axes if ax.get_images()]
    titles = {ax.get_title() for ax in panels}
    assert titles == {f"{t}: {m}" for t in ("json_kv", "niah_mk") for m in
                      ("exact match", "answer token accuracy", "answer log-likelihood per token")}
    shown = set()
    for ax in panels:
        image = ax.get_images()[0]
        for text in ax.texts:
            value = float(text.get_text())
            shown.add((ax.get_title().split(": ")[1], value))
            background = _luminance(image.cmap(image.norm(value)))
            # WCAG-style contrast between the number and its cell's colour.
            fg = _luminance(to_rgba(text.get_color()))
            light, dark = max(fg, background), min(fg, background)
            assert (light + 0.05) / (dark + 0.05) >= 3.0, (ax.get_title(), value)
    assert ("answer token accuracy", 0.95) in shown and ("exact match", 0.0) in shown
    assert any(m.startswith("answer log-likelihood") and v < 0 for m, v in shown)


def test_history_draws_training_loss_beside_validation_loss(monkeypatch, tmp_path):
    lines = [{"step": s, "loss": 6.0 - 0.1 * s, "lr": 1e-3} for s in range(1, 7)]
    lines.insert(4, {"step": 4, "eval": {"val_loss": 5.5}})  # an evaluation record
    lines.append({"step": 7, "loss": None, "skipped": True})  # a skipped step (NaN -> null)
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 8, "lo'  # torn last line
    (tmp_path / "metrics.jsonl").write_text(text)
    train = read_training_loss(str(tmp_path))
    assert train == [(s, 6.0 - 0.1 * s) for s in range(1, 7)]

    figures = _capture(monkeypatch)
    records = [{"step": s, "eval": {"val_loss": 5.9 - 0.1 * s}} for s in (2, 4, 6)]
    written = write_results(str(tmp_path / "eval"), "step_6", records[-1], None, records,
                            train_loss=train)
    assert any(p.endswith("history.png") for p in written)
    (fig,) = figures
    loss_axes = fig.axes[0]
    by_label = {line.get_label(): line for line in loss_axes.get_lines()}
    assert list(by_label["training loss (each step)"].get_xdata()) == list(range(1, 7))
    assert list(by_label["validation loss"].get_xdata()) == [2, 4, 6]
    assert not any(math.isnan(y) for y in by_label["training loss (each step)"].get_ydata())
