"""Typed data configuration: tokenizer, domain mixture, packing mode, sampling seed.

A mixture YAML (see examples/mixtures/) looks like::

    seq_length: 65536            # informational; the trainer's seq_length wins
    mode: short                  # default packing mode for domains that do not set one
    domains:
      - name: code_repos
        paths: [${PROLONG_DATA}/code_repos_64k]   # indexed-dataset prefixes (no .bin/.idx)
        proportion: 0.30
        mode: long
        min_doc_length: 65536

``${VAR}`` placeholders are filled from the ``variables`` argument, then from the environment;
one left unresolved is an error when the dataset is built (not when the config is parsed, so a
dry run works without the data).
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Optional

import yaml

from megatron_prolong.config_loading import yaml_error_summary

if TYPE_CHECKING:
    from .heldout import HeldOutSpec

MODES = ("long", "short", "sft")
SFT_OVERFLOW = ("truncate", "drop")
_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


@dataclass
class DomainConfig:
    name: str
    paths: list[str]
    proportion: float
    mode: Optional[str] = None             # None: DataConfig.mode
    min_doc_length: Optional[int] = None   # None: seq_length in long mode, else 1

    def __post_init__(self) -> None:
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        if self.proportion < 0:
            raise ValueError(f"domain {self.name!r}: negative proportion {self.proportion}")
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"domain {self.name!r}: mode {self.mode!r} not in {MODES}")


def effective_min_doc_length(mode: str, min_doc_length: Optional[int], seq_length: int) -> int:
    """The shortest document a stream keeps: the domain's own, else seq_length in long mode."""
    if min_doc_length is None:
        return seq_length if mode == "long" else 1
    return min_doc_length


@dataclass
class DataConfig:
    tokenizer_kind: str = "byte"
    tokenizer_path: Optional[str] = None
    mixture: Optional[str] = None          # a mixture YAML; its domains are appended to `domains`
    domains: list[DomainConfig] = field(default_factory=list)
    mode: str = "short"                    # default packing mode: long | short | sft
    min_doc_length: Optional[int] = None   # default for domains that do not set one
    seed: int = 1234
    smart_batching: bool = True            # order micro-batches of a global batch by attention cost
    sft_overflow: str = "truncate"         # truncate: cut at sequence end | drop: move/drop
    check_token_ids: bool = True           # verify every token id < vocab size while reading
    variables: dict[str, str] = field(default_factory=dict)  # for ${VAR} in paths
    # Documents each domain holds out for validation (data/heldout.py); training never sees them.
    heldout: Optional["HeldOutSpec"] = None

    def __post_init__(self) -> None:
        self.domains = [d if isinstance(d, DomainConfig) else DomainConfig(**d)
                        for d in self.domains]
        if self.mode not in MODES:
            raise ValueError(f"data.mode {self.mode!r} not in {MODES}")
        if isinstance(self.heldout, dict):
            from .heldout import HeldOutSpec

            self.heldout = HeldOutSpec(**self.heldout)
        if self.sft_overflow not in SFT_OVERFLOW:
            raise ValueError(f"data.sft_overflow {self.sft_overflow!r} not in {SFT_OVERFLOW}")

    def given_domains(self) -> list[DomainConfig]:
        """Domains from `domains` plus the mixture file, exactly as written."""
        return list(self.domains) + (load_mixture(self.mixture) if self.mixture else [])

    def resolved_domains(self) -> list[DomainConfig]:
        """Domains from `domains` plus the mixture file, with placeholders filled and
        proportions normalised to sum to 1."""
        domains = self.given_domains()
        if not domains:
            raise ValueError("data config has no domains: set data.mixture or data.domains")
        names = [d.name for d in domains]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate domain names in mixture: {names}")
        total = sum(d.proportion for d in domains)
        if total <= 0:
            raise ValueError("domain proportions sum to 0")
        return [DomainConfig(d.name, [self.expand(p) for p in d.paths], d.proportion / total,
                             d.mode or self.mode,
                             d.min_doc_length if d.min_doc_length is not None
                             else self.min_doc_length)
                for d in domains]

    def expand(self, path: str) -> str:
        def sub(m: re.Match) -> str:
            key = m.group(1)
            if key in self.variables:
                return str(self.variables[key])
            if key in os.environ:
                return os.environ[key]
            raise ValueError(f"path {path!r}: placeholder ${{{key}}} is not set; export {key}=... "
                             "or pass it in data.variables")
        return _PLACEHOLDER.sub(sub, path)

    def to_dict(self) -> dict:
        return asdict(self)


def load_mixture(path: str) -> list[DomainConfig]:
    """Read the `domains:` list of a mixture YAML (placeholders are left as they are)."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the mixture file ({exc.strerror})") from None
    except yaml.YAMLError as exc:  # a tag such as !!python/object included: one line, no code
        line, problem = yaml_error_summary(exc)
        raise ValueError(f"{path}{f':{line}' if line else ''}: not valid YAML: {problem}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("domains"), list):
        raise ValueError(f"{path}: a mixture file needs a top-level 'domains:' list")
    out = []
    for i, d in enumerate(raw["domains"]):
        try:
            out.append(DomainConfig(**d))
        except TypeError as e:
            raise ValueError(f"{path}: domain #{i}: {e}") from None
    if raw.get("mode") is not None:
        out = [DomainConfig(d.name, d.paths, d.proportion, d.mode or raw["mode"],
                            d.min_doc_length) for d in out]
    return out
