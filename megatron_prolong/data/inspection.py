"""What a run will read, computed from the very dataset the loader draws from (a MixtureDataset):
each domain's token share over the first steps, how many epochs of each domain the token budget
consumes, document lengths per domain, the attention cost of each row, and rows rendered as text
with their document boundaries. tools/inspect_data.py prints these and draws them.

Nothing here reads more tokens than the rows it renders: shares, epochs and costs come from the
packing plan (document lengths in the index), as smart batching's do.
"""
from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from .mixture import MixtureDataset, blending_indices
from .packing import attention_cost
from .tokenizer import Tokenizer


@dataclass
class DomainShare:
    domain: str
    target: float        # the mixture's proportion (normalised)
    samples: int         # rows drawn from the domain
    tokens: int          # document tokens in them (padding excluded)
    sample_share: float
    token_share: float


@dataclass
class DomainEpochs:
    domain: str
    mode: str
    documents: int       # documents that pass the domain's filter
    dropped: int         # documents below min_doc_length (or too long for sft 'drop')
    tokens_per_epoch: int
    samples: int         # rows of the whole run drawn from the domain
    tokens_consumed: int
    epochs: float


def _pieces(dataset: MixtureDataset, i: int):
    d, k = dataset.locate(i)
    return d, dataset.streams[d].pieces(k)


def token_shares(dataset: MixtureDataset, num_samples: int) -> list[DomainShare]:
    """Realised shares over samples [0, num_samples) against the targets."""
    n = len(dataset.streams)
    samples, tokens = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    for i in range(num_samples):
        d, pieces = _pieces(dataset, i)
        samples[d] += 1
        tokens[d] += sum(p.length for p in pieces)
    total_s, total_t = max(int(samples.sum()), 1), max(int(tokens.sum()), 1)
    return [DomainShare(s.name, float(dataset.weights[d]), int(samples[d]), int(tokens[d]),
                        samples[d] / total_s, tokens[d] / total_t)
            for d, s in enumerate(dataset.streams)]


def epochs_consumed(dataset: MixtureDataset, total_samples: int) -> list[DomainEpochs]:
    """Epochs of each domain that ``total_samples`` rows use (rows x seq_length tokens drawn
    from the domain over its kept tokens; SFT rows count their padding, so slightly over)."""
    domain, _ = blending_indices(dataset.weights, total_samples)
    counts = np.bincount(domain, minlength=len(dataset.streams))
    out = []
    for d, s in enumerate(dataset.streams):
        consumed = int(counts[d]) * dataset.seq_length
        out.append(DomainEpochs(s.name, s.mode, len(s.docs), len(s.pool) - len(s.docs),
                                s.tokens_per_epoch, int(counts[d]), consumed,
                                consumed / max(s.tokens_per_epoch, 1)))
    return out


def document_lengths(dataset: MixtureDataset) -> dict[str, np.ndarray]:
    """Lengths (tokens) of the documents each domain samples from, after its filter."""
    return {s.name: s.pool.lengths[s.docs] for s in dataset.streams}


def row_costs(dataset: MixtureDataset, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(attention cost of each row as a fraction of one full causal row = sum of squared
    segment lengths / seq_length^2, domain index of each row) for samples [0, num_samples).
    The cost is smart batching's ordering key, padding segments included as it counts them."""
    L = float(dataset.seq_length)
    costs = np.zeros(num_samples)
    domains = np.zeros(num_samples, dtype=np.int64)
    for i in range(num_samples):
        lens = dataset.segment_lengths(i)
        costs[i] = attention_cost(np.concatenate([[0], np.cumsum(lens)])) / (L * L)
        domains[i] = dataset.locate(i)[0]
    return costs, domains


def log2_histogram(values: np.ndarray) -> list[tuple[int, int, int]]:
    """(low, high, count) over power-of-two bins [2^k, 2^(k+1)) that hold values."""
    values = np.asarray(values, dtype=np.int64)
    if not len(values):
        return []
    exps = np.floor(np.log2(np.maximum(values, 1))).astype(np.int64)
    counts = np.bincount(exps - exps.min())
    low = int(exps.min())
    return [(2 ** (e + low), 2 ** (e + low + 1), int(c)) for e, c in enumerate(counts) if c]


_ESCAPES = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _snippet(text: str, chars: int) -> str:
    text = text.translate(_ESCAPES)  # one line per document
    return text if len(text) <= 2 * chars + 5 else f"{text[:chars]} [...] {text[-chars:]}"


def render_micro_batch(batch: dict, tokenizer: Tokenizer, seq_length: int, chars: int = 80,
                       header: str = "", max_segments: int = 8) -> list[str]:
    """One collated micro-batch (DataSource.next_step()) as text: per row its domain, attention
    cost and loss tokens, then its document segments (the first and last ``max_segments // 2``
    of a longer row) with their length, start and end."""
    tokens = batch["tokens"][0].numpy()
    loss = batch["loss_mask"][0].numpy()
    cu = batch["cu_seqlens"].numpy().astype(np.int64)
    pad_id = int(batch["labels"][0, -1])
    lines = []
    for j, domain in enumerate(batch["domains"]):
        lo, hi = j * seq_length, (j + 1) * seq_length
        bounds = cu[(cu >= lo) & (cu <= hi)]
        segs = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
        cost = attention_cost(bounds - lo) / float(seq_length) ** 2
        lines.append(f"{header}row {j} | domain {domain} | {len(segs)} segments | attention cost "
                     f"{cost:.3f} of a full row | loss on {int(loss[lo:hi].sum()):,} tokens")
        half = max(max_segments // 2, 1)
        for n, (a, b) in enumerate(segs):
            if len(segs) > max_segments and half <= n < len(segs) - half:
                if n == half:
                    lines.append(f"  || ... {len(segs) - 2 * half:,} more segments ...")
                continue
            seg = tokens[a:b]
            if (seg == pad_id).all() and not loss[a:b].any() and b == hi and n:
                lines.append(f"  || padding: {b - a:,} tokens")
                continue
            lines.append(f"  || doc {n} | {b - a:,} tokens | "
                         f"{_snippet(tokenizer.decode(seg.tolist()), chars)}")
    return lines


def percentiles(values: np.ndarray, qs=(0, 10, 50, 90, 100)) -> str:
    if not len(values):
        return "(none)"
    return ", ".join(f"p{q} {np.percentile(values, q):,.3g}" for q in qs)


def text_histogram(values: np.ndarray, edges: np.ndarray, width: int = 40,
                   fmt: str = "{:.2f}") -> list[str]:
    counts, _ = np.histogram(values, bins=edges)
    top = max(int(counts.max()), 1) if len(counts) else 1
    last = len(counts) - 1  # numpy's last bin includes its right edge
    return [f"  [{fmt.format(lo)}, {fmt.format(hi)}{']' if k == last else ')'} {int(c):>7,} "
            + "#" * int(round(width * c / top))
            for k, (lo, hi, c) in enumerate(zip(edges[:-1], edges[1:], counts))]


def repeat_warnings(epochs: list[DomainEpochs], max_epochs: float) -> list[str]:
    return [f"warning: domain {e.domain!r} is repeated {e.epochs:.1f} times (more than "
            f"{max_epochs:g}): {e.tokens_per_epoch:,} tokens per epoch for {e.tokens_consumed:,} "
            "consumed; add data or lower its proportion"
            for e in epochs if e.epochs > max_epochs]


def summarise_costs(costs: np.ndarray, domains: np.ndarray, names: list[str]
                    ) -> list[tuple[str, str]]:
    rows = [("all", percentiles(costs))]
    rows += [(name, percentiles(costs[domains == d])) for d, name in enumerate(names)
             if (domains == d).any()]
    return rows
