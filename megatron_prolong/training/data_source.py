"""cfg.data -> this rank's micro-batches for each optimizer step, resumable from a sample count.

Kinds: `synthetic` (random packed rows, no files; for tests), `demo` (the offline byte-level
demo corpus, built on first use), `mixture` (a domain mixture YAML of indexed datasets) and
`sft` (the same in SFT packing mode). Every kind is a pure function of (config, seed, global
sample index), and the data-parallel split is megatron's: step k uses samples
[k*G, (k+1)*G) of which this DP rank takes its share (smart batching optional). Resuming from
`consumed_samples` therefore yields exactly what an uninterrupted run would have seen.

Each micro-batch also carries `domain_ids` (per token, into `domain_names`) and `num_domains`
for the per-domain loss curves.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import fields
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_prolong.config import ConfigError, Layout, RunConfig
from megatron_prolong.data.batching import RankBatchIterator
from megatron_prolong.data.packing import PackedSample, build_sample
from megatron_prolong.training.agreement import on_all_ranks

KINDS = ("synthetic", "demo", "mixture", "sft")


class SyntheticPackedDataset:
    """Random tokens in 1-4 documents per sample, from a generator seeded by (seed, index)."""

    DOMAINS = ("synthetic_a", "synthetic_b")

    def __init__(self, seq_length: int, vocab_size: int, seed: int) -> None:
        self.seq_length, self.vocab_size, self.seed = seq_length, vocab_size, seed

    def __len__(self) -> int:
        return 2**62

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(i)])

    def segment_lengths(self, i: int) -> np.ndarray:
        rng = self._rng(i)
        n_docs = int(rng.integers(1, 5))
        cuts = np.sort(rng.choice(np.arange(1, self.seq_length), n_docs - 1, replace=False))
        return np.diff(np.concatenate([[0], cuts, [self.seq_length]]))

    def __getitem__(self, i: int) -> PackedSample:
        lengths = self.segment_lengths(i)
        tokens = np.random.default_rng([self.seed, int(i), 1]).integers(
            0, self.vocab_size, self.seq_length)
        segments = np.split(tokens, np.cumsum(lengths)[:-1])
        return build_sample(segments, self.seq_length, self.DOMAINS[i % 2], pad_id=0)


class DataSource:
    """Per step: `next_step()` -> this rank's list of collated micro-batches."""

    def __init__(self, dataset, domain_names: list[str], cfg: RunConfig, layout: Layout,
                 dp_rank: int, consumed_samples: int = 0) -> None:
        self.domain_names = list(domain_names)
        self._index = {name: i for i, name in enumerate(self.domain_names)}
        self._iter = RankBatchIterator(
            dataset, cfg.training.global_batch_size, cfg.training.micro_batch_size,
            dp_rank, layout.dp, consumed_samples=consumed_samples,
            smart_batching=cfg.data.smart_batching,
            # CP document padding is done by the train step for the model's own layout.
            pad_to_multiple_of=1)
        self.seq_length = cfg.training.seq_length

    @property
    def dataset(self):
        """The global sample index -> PackedSample dataset behind the batches (read by
        tools/inspect_data.py, so that it shows exactly what this loader feeds)."""
        return self._iter.dataset

    @property
    def consumed_samples(self) -> int:
        return self._iter.consumed_samples

    def next_step(self, interrupted: Optional[Callable[[], bool]] = None
                  ) -> Optional[list[dict]]:
        """None when `interrupted()` (asked after each micro-batch) said stop."""
        batches = self._iter.next_batches(interrupted)
        if batches is None:
            return None
        for batch in batches:
            ids = torch.tensor([self._domain_id(d) for d in batch["domains"]], dtype=torch.int64)
            per_sample = batch["tokens"].shape[1] // len(batch["domains"])
            batch["domain_ids"] = ids.repeat_interleave(per_sample)[None]
            batch["num_domains"] = len(self.domain_names)
        return batches

    def _domain_id(self, name: str) -> int:
        if name not in self._index:  # a domain the dataset did not announce up front
            self._index[name] = len(self.domain_names)
            self.domain_names.append(name)
        return self._index[name]


def _data_config(cfg: RunConfig, options: Optional[dict] = None, **extra):
    from megatron_prolong.data.config import DataConfig

    options = cfg.data.options if options is None else options
    known = {f.name for f in fields(DataConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"data.options: unknown key(s) {unknown}; known: {sorted(known)}")
    args = dict(tokenizer_kind=cfg.data.tokenizer, tokenizer_path=cfg.data.tokenizer_path,
                mixture=cfg.data.mixture, seed=cfg.training.seed,
                smart_batching=cfg.data.smart_batching, heldout=heldout_spec(cfg))
    args.update(options)
    args.update(extra)
    return DataConfig(**args)


def heldout_spec(cfg: RunConfig):
    """The documents each domain keeps out of training for validation (evaluation section);
    None when validation reads separate datasets or nothing is held out."""
    from megatron_prolong.data.heldout import HeldOutSpec

    e = cfg.evaluation
    spec = HeldOutSpec(e.heldout_docs, e.heldout_fraction, e.heldout_seed)
    return spec if spec.active and not e.validation_mixture else None


def tokenizer_for_model(cfg: RunConfig, data_cfg):
    """The run's tokenizer, refused early when its vocabulary does not fit the model's."""
    from megatron_prolong.data.tokenizer import (TokenizerMismatchError, build_tokenizer,
                                                 check_tokenizer_matches_model)

    tokenizer = build_tokenizer(data_cfg.tokenizer_kind, data_cfg.tokenizer_path)
    try:
        check_tokenizer_matches_model(tokenizer, cfg.model.vocab_size)
    except TokenizerMismatchError as err:
        raise ConfigError(f"data.tokenizer={data_cfg.tokenizer_kind!r} vs model.vocab_size="
                          f"{cfg.model.vocab_size}: {err}") from None
    return tokenizer


def run_tokenizer(cfg: RunConfig, data_cfg=None):
    """The tokenizer of the run's data (`data_cfg`: the training data's configuration, when
    built; else read from cfg.data)."""
    return tokenizer_for_model(cfg, data_cfg or _data_config(cfg))


def demo_corpus_dir(cfg: RunConfig) -> str:
    return cfg.data.options.get("corpus_dir") or os.path.join(cfg.run_dir, "demo_corpus")


def _build_demo(cfg: RunConfig, rank: int):
    from megatron_prolong.data.demo_corpus import build_demo_corpus

    out_dir = demo_corpus_dir(cfg)
    # Rank 0 writes the corpus; the others wait and then read the same files. A failure on
    # rank 0 (a full disk, say) reaches every rank at once instead of leaving them in the
    # broadcast until the process-group timeout.
    domains = on_all_ranks(
        lambda: build_demo_corpus(out_dir, seed=cfg.training.seed,
                                  progress=lambda line: print(line, flush=True))
        if rank == 0 else None)
    if dist.is_initialized():
        holder = [domains]
        dist.broadcast_object_list(holder, src=0)
        domains = holder[0]
    options = {k: v for k, v in cfg.data.options.items() if k != "corpus_dir"}
    # The corpus was just written with this tokenizer: no token-id scan (reads still check).
    dataset, data_cfg = on_all_ranks(lambda: _open_datasets(
        cfg, rank, options, scan=False, tokenizer_kind="byte", mixture=None, domains=domains))
    return dataset, [d.name for d in domains], data_cfg


@contextlib.contextmanager
def _data_errors_named(where: str) -> Iterator[None]:
    """Errors in the data (a missing file, a damaged dataset, token ids outside the
    vocabulary) become one-line ConfigErrors that start with the setting `where`
    (train.py: exit 2)."""
    from megatron_prolong.data.indexed import DataFileError

    try:
        yield
    except ConfigError:
        raise
    except (DataFileError, ValueError, TypeError, OSError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _training_data_setting(cfg: RunConfig) -> str:
    return f"data.mixture={cfg.data.mixture}" if cfg.data.mixture else f"data.kind={cfg.data.kind}"


def _open_datasets(cfg: RunConfig, rank: int, options: Optional[dict] = None, scan: bool = True,
                   **data_args):
    """Open every dataset of the mixture; rank 0 also scans each file's largest token id
    (cached) and prints the rescaled mixture when the proportions do not sum to 1. Errors in
    the data become one-line ConfigErrors naming the file (train.py: exit 2).
    Returns (dataset, its DataConfig)."""
    from megatron_prolong.data.mixture import build_pretraining_dataset, rescaled_mixture_table

    with _data_errors_named(_training_data_setting(cfg)):
        data_cfg = _data_config(cfg, options, **data_args)
        tokenizer = tokenizer_for_model(cfg, data_cfg)
        if rank == 0:
            table = rescaled_mixture_table(data_cfg)
            if table:
                print(table, flush=True)
        dataset = build_pretraining_dataset(data_cfg, cfg.training.seq_length,
                                            tokenizer=tokenizer, scan_token_ids=scan and rank == 0)
        return dataset, data_cfg


def build_data_source(cfg: RunConfig, layout: Layout, dp_rank: int, consumed_samples: int = 0,
                      rank: Optional[int] = None) -> DataSource:
    kind = cfg.data.kind
    rank = (dist.get_rank() if dist.is_initialized() else 0) if rank is None else rank
    data_cfg = None
    if kind == "synthetic":
        dataset = SyntheticPackedDataset(cfg.training.seq_length, cfg.model.vocab_size,
                                         cfg.training.seed)
        names = list(SyntheticPackedDataset.DOMAINS)
    elif kind == "demo":
        dataset, names, data_cfg = _build_demo(cfg, rank)
    elif kind in ("mixture", "sft"):
        if not cfg.data.mixture and not cfg.data.options.get("domains"):
            raise ConfigError(f"data.kind={kind}: set data.mixture to a mixture YAML "
                              "(see examples/mixtures/)")
        dataset, data_cfg = on_all_ranks(lambda: _open_datasets(
            cfg, rank, **({"mode": "sft"} if kind == "sft" else {})))
        names = dataset.domain_names
    else:
        raise ConfigError(f"data.kind={kind!r}: choose one of {', '.join(KINDS)}")
    source = DataSource(dataset, names, cfg, layout, dp_rank, consumed_samples)
    source.data_cfg = data_cfg  # what validation carves its held-out rows from
    return source


def build_validation_samples(cfg: RunConfig, data_cfg) -> list[PackedSample]:
    """The held-out rows evaluation scores every time: `evaluation.validation_rows` per domain,
    from the documents training holds out (`data_cfg` is the training data's configuration,
    DataSource.data_cfg), or from the datasets of `evaluation.validation_mixture`. Synthetic
    data draws its rows from another seed."""
    from megatron_prolong.data.heldout import validation_samples

    e, seq = cfg.evaluation, cfg.training.seq_length
    if cfg.data.kind == "synthetic":
        if heldout_spec(cfg) is None:
            return []
        data = SyntheticPackedDataset(seq, cfg.model.vocab_size, e.heldout_seed)
        return [data[i] for i in range(e.validation_rows * len(data.DOMAINS))]
    where = (f"evaluation.validation_mixture={e.validation_mixture}" if e.validation_mixture
             else _training_data_setting(cfg))
    with _data_errors_named(where):
        if e.validation_mixture:
            data_cfg = _data_config(cfg, mixture=e.validation_mixture, domains=[],
                                    **({"mode": "sft"} if cfg.data.kind == "sft" else {}))
            spec = None
        else:
            spec = data_cfg.heldout if data_cfg is not None else None
            if spec is None:
                return []
        tokenizer = tokenizer_for_model(cfg, data_cfg)
        return validation_samples(data_cfg.resolved_domains(), seq, e.validation_rows, spec,
                                  tokenizer.pad_id, data_cfg.mode, data_cfg.sft_overflow,
                                  tokenizer.vocab_size if data_cfg.check_token_ids else None)
