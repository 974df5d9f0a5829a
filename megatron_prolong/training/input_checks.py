"""What a recipe points at, checked before torch is imported or anything is written.

A missing mixture file, an unset ${VAR} in a data path, a dataset prefix without its .bin/.idx
or a tokenizer file that is not there would otherwise surface after half a minute of start-up,
with config.yaml and run.lock already in the run directory. These checks read only the file
system (standard library, PyYAML, numpy-free modules), so a bad input fails at once; the data
are still read and checked in full when the datasets are opened.
"""
from __future__ import annotations

import os

from megatron_prolong.config import ConfigError, RunConfig
from megatron_prolong.data.config import DataConfig

DATA_KINDS = ("synthetic", "demo", "mixture", "sft")
TOKENIZER_FILE_KINDS = ("llama3", "tiktoken", "sentencepiece", "llama2", "hf", "huggingface")


def _mixture_problems(setting: str, mixture: str, options: dict) -> list[str]:
    """A mixture file: present, readable, every ${VAR} set, every prefix's .bin and .idx there."""
    if not os.path.isfile(mixture):
        return [f"{setting}: no such file (a mixture YAML; see examples/mixtures/)"]
    data = DataConfig(mixture=mixture, variables=dict(options.get("variables") or {}))
    try:
        domains = data.resolved_domains()
    except ValueError as exc:  # bad YAML, no domains, an unset placeholder
        return [f"{setting}: {exc}"]
    problems = []
    for domain in domains:
        for prefix in domain.paths:
            missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
            if missing:
                problems.append(f"{setting}: domain {domain.name!r}: {' and '.join(missing)} "
                                "not found (paths are dataset prefixes, without .bin/.idx)")
    return problems


def input_problems(cfg: RunConfig) -> list[str]:
    """One line per input of the recipe that cannot be read."""
    d, problems = cfg.data, []
    if d.kind not in DATA_KINDS:
        return [f"data.kind={d.kind!r}: choose one of {', '.join(DATA_KINDS)}"]
    if d.kind in ("mixture", "sft"):
        if d.mixture:
            problems += _mixture_problems(f"data.mixture={d.mixture}", d.mixture, d.options)
        elif not d.options.get("domains"):
            problems.append(f"data.kind={d.kind}: set data.mixture to a mixture YAML "
                            "(see examples/mixtures/)")
        if d.tokenizer.lower() in TOKENIZER_FILE_KINDS:
            if not d.tokenizer_path:
                problems.append(f"data.tokenizer={d.tokenizer}: needs data.tokenizer_path (its "
                                "tokenizer.model / tokenizer.json)")
            elif not os.path.exists(d.tokenizer_path):
                problems.append(f"data.tokenizer_path={d.tokenizer_path}: no such file")
    mixture = cfg.evaluation.validation_mixture
    if mixture and d.kind != "synthetic":
        problems += _mixture_problems(f"evaluation.validation_mixture={mixture}", mixture,
                                      d.options)
    return problems


def check_inputs(cfg: RunConfig) -> None:
    """Raise one ConfigError listing every input that is not there."""
    problems = input_problems(cfg)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError("inputs not found:\n  - " + "\n  - ".join(problems))
