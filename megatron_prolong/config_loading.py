"""Loading a run configuration: a YAML recipe, then `key=value` overrides -> RunConfig.

config.py is the schema (dataclasses, presets, validation); this module turns what the user
wrote into it. Every value keeps where it came from, so that an error names what the user
typed and suggests the field they probably meant:

    override training.train_step=10: training.train_step: unknown field; did you mean training.train_steps?
    examples/demo_cpu.yaml:16: training.train_steps: expected an integer, got 'ten'

Only the standard library and PyYAML are imported here: a bad recipe or override fails in a
fraction of a second, before the entry point imports torch or megatron-core. YAML is read with
the safe loader: a tag such as `!!python/object` is an error (one line), never code.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from typing import Any, Optional

import yaml

from megatron_prolong.config import MODEL_PRESETS, ConfigError, ModelConfig, RunConfig


class FieldError(ConfigError):
    """A bad value or name at one dotted field (`training.train_steps`); whoever loaded the
    mapping says where it came from."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field, self.detail = field, detail


def yaml_error_summary(exc: yaml.YAMLError) -> tuple[Optional[int], str]:
    """(1-based line or None, one-line description) of a PyYAML error, whose own text spans
    several lines."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    text = f"{context}: {problem}" if context and problem else problem
    if "constructor for the tag" in text:
        text += " (tags such as !!python/object are not accepted: write plain values)"
    return (mark.line + 1 if mark is not None else None), " ".join(text.split())


# ---------------------------------------------------------------------------------------------
# Mapping -> dataclasses
# ---------------------------------------------------------------------------------------------
def _type_of(cls, name: str):
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, typ, field: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], field)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise FieldError(field, f"expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise FieldError(field, f"expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise FieldError(field, f"expected an integer, got {value!r}") from None
        if f != int(f):
            raise FieldError(field, f"expected an integer, got {value!r}")
        return int(f)
    if typ is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise FieldError(field, f"expected a number, got {value!r}") from None
    if typ is str:
        return str(value)
    if origin is list:  # a YAML list, or one value / "a,b" from the command line
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        (item,) = typing.get_args(typ) or (Any,)
        return [v if item is Any else _coerce(v, item, f"{field}[{i}]")
                for i, v in enumerate(value)]
    if typ is dict or origin is dict:
        if isinstance(value, str):
            value = _safe_load(value, field)
        if not isinstance(value, dict):
            raise FieldError(field, f"expected a mapping, got {value!r}")
        return value
    return value


def _unknown_field(field: str, key: str, names: set[str]) -> FieldError:
    close = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.6)
    section = field.rsplit(".", 1)[0] + "." if "." in field else ""
    hint = (f"did you mean {section}{close[0]}?" if close
            else f"known fields are {', '.join(sorted(names))}")
    return FieldError(field, f"unknown field; {hint}")


def _apply_mapping(obj, mapping: dict, prefix: str) -> None:
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in mapping.items():
        field = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise _unknown_field(field, str(key), names)
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise FieldError(field, f"expected a section (mapping), got {value!r}")
            _apply_mapping(current, value, field)
        else:
            setattr(obj, key, _coerce(value, _type_of(type(obj), key), field))


def _apply_model_preset(model_section: dict) -> ModelConfig:
    model = ModelConfig()
    preset = model_section.get("preset")
    if preset is not None:
        if preset not in MODEL_PRESETS:
            raise FieldError("model.preset", f"unknown preset {preset!r}; choose one of "
                             f"{sorted(MODEL_PRESETS)}")
        _apply_mapping(model, MODEL_PRESETS[preset], "model")
    _apply_mapping(model, model_section, "model")
    return model


def _build(raw: dict) -> RunConfig:
    raw = dict(raw or {})
    cfg = RunConfig()
    model_section = raw.pop("model", {}) or {}
    if not isinstance(model_section, dict):
        raise FieldError("model", "expected a section (mapping)")
    cfg.model = _apply_model_preset(model_section)
    _apply_mapping(cfg, raw, "")
    return cfg


def config_from_dict(raw: dict, where: str = "config") -> RunConfig:
    """A RunConfig from a parsed mapping (a saved config.yaml); errors read `WHERE.FIELD: ...`."""
    try:
        return _build(raw)
    except FieldError as err:
        raise ConfigError(f"{where}.{err}") from None


# ---------------------------------------------------------------------------------------------
# Recipe and overrides, each value with its origin
# ---------------------------------------------------------------------------------------------
def _safe_load(text: str, origin: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = yaml_error_summary(exc)[1]
        raise ConfigError(f"{origin}: not a valid YAML value: {problem}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.field=value` -> (["section", "field"], the value as YAML reads it)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. training.train_steps=10")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {text!r}: expected section.field=value, e.g. "
                          "training.train_steps=10")
    return path, _safe_load(raw, f"override {text}") if raw.strip() else ""


def _nest(overrides: list[str]) -> tuple[dict, dict[str, str]]:
    """The overrides as a nested mapping, and dotted key -> the override as typed."""
    tree: dict = {}
    origins: dict[str, str] = {}
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is set twice")
        node[path[-1]] = value
        origins[".".join(path)] = f"override {text}"
    return tree, origins


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "options":
            out[key] = _merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _read_recipe(recipe: str) -> tuple[dict, dict[str, str]]:
    """The recipe's mapping, and dotted key -> `FILE:LINE` of every key in it."""
    if not os.path.exists(recipe):
        raise ConfigError(f"recipe {recipe!r} does not exist (give a YAML file under examples/)")
    with open(recipe) as f:
        text = f.read()
    try:
        raw = yaml.safe_load(text) or {}
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        line, problem = yaml_error_summary(exc)
        where = f"{recipe}:{line}" if line else recipe
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{recipe}: the top level must be a mapping of sections")
    origins: dict[str, str] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                dotted = f"{prefix}.{key.value}" if prefix else str(key.value)
                origins[dotted] = f"{recipe}:{key.start_mark.line + 1}"
                walk(value, dotted)

    walk(root, "")
    return raw, origins


def _origin_of(field: str, origins: dict[str, str], fallback: str) -> str:
    """Where the value at `field` came from: the override or recipe line that set it (or a
    section around it), else `fallback`."""
    key = re.sub(r"\[\d+\]$", "", field)
    while key:
        if key in origins:
            return origins[key]
        # an override below this key (a misspelt section: `trainng.seq_length=1`)
        below = [k for k in origins if k.startswith(key + ".")]
        if below:
            return origins[below[-1]]
        key = key.rpartition(".")[0]
    return fallback


def load_config(recipe: Optional[str] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Read a YAML recipe (or the built-in defaults when None) and apply key=value overrides.
    Errors (ConfigError) start with the override or the recipe's `FILE:LINE` they concern."""
    raw, origins = _read_recipe(recipe) if recipe is not None else ({}, {})
    tree, override_origins = _nest(overrides or [])
    raw = _merge(raw, tree)
    # an override replaces the recipe's value: it is what an error there is about
    override_keys = {k for k in origins for o in override_origins
                     if k == o or k.startswith(o + ".")}
    origins = {**{k: v for k, v in origins.items() if k not in override_keys}, **override_origins}
    try:
        return _build(raw)
    except FieldError as err:
        origin = _origin_of(err.field, origins, recipe or "config")
        raise ConfigError(f"{origin}: {err}") from None
