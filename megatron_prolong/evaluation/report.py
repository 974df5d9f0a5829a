"""Evaluation results as a record (metrics.jsonl, results JSON), TensorBoard scalars, a console
line and the recall table."""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Optional

from megatron_prolong.evaluation.validation import ValidationResult


def eval_record(step: Optional[int], validation: Optional[ValidationResult],
                recall: Optional[dict]) -> dict:
    """{'step', 'eval': {validation fields..., 'recall': summary without per-example rows}}."""
    out: dict = {}
    if validation is not None:
        v = asdict(validation)
        out.update({f"val_{k}" if not k.startswith("val") else k: v[k] for k in v})
    if recall is not None:
        out["recall"] = {k: v for k, v in recall.items() if k != "examples"}
    return {"step": step, "eval": out}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def eval_scalars(record: dict) -> dict[str, float]:
    """TensorBoard tags -> values."""
    e, out = record["eval"], {}
    if "val_loss" in e:
        out["val/loss"] = e["val_loss"]
        out["val/long_document_loss"] = e.get("val_long_loss")
        out.update({f"val_domain/{k}": v for k, v in e["val_domain_loss"].items()})
        out.update({f"val_position/{k}": v for k, v in e["val_position_loss"].items()})
    recall = e.get("recall") or {}
    if recall.get("overall"):
        out["recall/exact_match"] = recall["overall"]["exact_match"]
        out["recall/token_accuracy"] = recall["overall"]["token_accuracy"]
        for task, m in recall["tasks"].items():
            for key in ("exact_match", "token_accuracy", "mean_logprob"):
                out[f"recall_{task}/{key}"] = m[key]
        for cell in recall["cells"]:
            out[f"recall_{cell['task']}/exact_match_{cell['length']}_depth"
                f"{cell['depth']:.2f}"] = cell["exact_match"]
    return {k: float(v) for k, v in out.items() if _finite(v)}


def eval_line(record: dict) -> str:
    """One console line: validation by domain and position, recall by task."""
    step = record["step"]
    e, parts = record["eval"], ["eval" if step is None else f"eval step {step}"]
    if "val_loss" in e:
        domains = ", ".join(f"{k} {v:.3f}" for k, v in e["val_domain_loss"].items())
        parts.append(f"val loss {e['val_loss']:.4f} ({domains})")
        if e["val_position_loss"]:
            parts.append("by position " + ", ".join(
                f"{k} {v:.3f}" for k, v in e["val_position_loss"].items()))
    recall = e.get("recall") or {}
    if recall.get("overall"):
        tasks = ", ".join(f"{k} {m['exact_match']:.2f}" for k, m in recall["tasks"].items())
        parts.append(f"recall exact match {recall['overall']['exact_match']:.2f} ({tasks})")
        parts.append(f"answer token accuracy {recall['overall']['token_accuracy']:.2f}")
    return " | ".join(parts)


def recall_table(recall: dict, title: str = "recall") -> str:
    """Rows task x length, columns depths; a cell is 'exact match / token accuracy'."""
    cells = recall.get("cells") or []
    if not cells:
        return f"{title}: no examples"
    depths = sorted({c["depth"] for c in cells})
    rows: dict = {}
    for c in cells:
        rows.setdefault((c["task"], c["length"]), {})[c["depth"]] = c
    head = f"{'task':<8} {'length':>7}  " + "  ".join(f"{'depth ' + f'{d:.2f}':>11}" for d in depths)
    lines = [f"{title} (exact match / answer token accuracy; examples per cell: "
             f"{cells[0]['examples']})", head + f"  {'mean log-lik':>12}"]
    for (task, length), by_depth in sorted(rows.items()):
        row = [f"{by_depth[d]['exact_match']:.2f} / {by_depth[d]['token_accuracy']:.2f}"
               if d in by_depth else "-" for d in depths]
        ll = sum(c["mean_logprob"] for c in by_depth.values()) / len(by_depth)
        lines.append(f"{task:<8} {length:>7}  " + "  ".join(f"{x:>11}" for x in row)
                     + f"  {ll:>12.3f}")
    return "\n".join(lines)
