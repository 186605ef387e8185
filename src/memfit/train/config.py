"""Training configs: YAML files in configs/, every key overridable.

A config has three sections. `model`: `name` and the model's architecture
keys. `data`: `path` (a text file for gpt; the others use generated data).
`training`: the keys of `TRAINING` below. `gradient_checkpointing` is
false, true (every block), a strategy string (`selective`, `every:2`, ...),
`budget:60%` / `budget:8GiB` (planned for the first batch), or, for vit-jepa,
a mapping {encoder: ..., predictor: ...}.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from pathlib import Path

import yaml

from memfit.core import schedule
from memfit.errors import MemfitError

TRAINING = {
    "batch_size": 32,
    "max_iters": 300,
    "learning_rate": 1e-3,
    "weight_decay": 0.0,
    "gradient_checkpointing": False,
    "precision": "fp32",
    "log_interval": 10,
    "eval_interval": 100,
    "eval_iters": 10,
    "device": "auto",
    "seed": 0,
    "memory_budget": None,
    "ema_momentum": 0.996,
    "distributed": "none",
}
FLEXIBLE = {"gradient_checkpointing", "memory_budget"}  # several types allowed
PRECISIONS = ("fp32", "bf16", "fp16")
DISTRIBUTED = ("none", "ddp", "fsdp")


def model_keys(name: str) -> dict:
    """The architecture keys a model takes, with their defaults."""
    from memfit.train.recipes import RECIPES

    if name not in RECIPES:
        raise MemfitError(f"unknown model {name!r} in the config; models: {', '.join(RECIPES)}.")
    arch = RECIPES[name].architecture
    if dataclasses.is_dataclass(arch):
        return {f.name: getattr(arch(), f.name) for f in dataclasses.fields(arch)}
    return {k: p.default for k, p in inspect.signature(arch).parameters.items()}


def read(path: str | None) -> dict:
    if path is None:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise MemfitError(
            f"cannot read config {path}: {e.strerror}; give a YAML file such as configs/gpt-char.yaml."
        ) from None
    except UnicodeDecodeError:
        raise MemfitError(
            f"config {path} is not a text file; give a YAML file such as configs/gpt-char.yaml."
        ) from None
    except yaml.YAMLError as e:
        raise MemfitError(f"config {path} is not valid YAML ({str(e).splitlines()[0]}); fix the file.") from None
    if not isinstance(data, dict):
        raise MemfitError(f"config {path} must be a mapping with model, data and training sections.")
    return data


def _coerce(key: str, value, default):
    """`value` as the type of `default`, or a clear error."""
    if isinstance(value, str) and not isinstance(default, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    if (
        default is None
        or isinstance(value, type(default))
        and not (isinstance(value, bool) and not isinstance(default, bool))
    ):
        return value
    if isinstance(default, bool):
        kind = "true or false"
    elif isinstance(default, int):
        kind = "an integer"
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            kind = "a number"
    elif isinstance(default, tuple) and isinstance(value, list):
        return tuple(value)
    else:
        kind = f"of type {type(default).__name__}"
    raise MemfitError(f"{key} must be {kind}, got {value!r}.")


def resolve(path: str | None, overrides: dict) -> dict:
    """The config file merged over the defaults, then the `overrides`
    ({"training.batch_size": "64", ...}); checked key by key."""
    raw = read(path)
    name = overrides["model.name"] if "model.name" in overrides else (raw.get("model") or {}).get("name") or "gpt"
    defaults = {
        "model": {"name": "gpt", **model_keys(name)},
        "data": {"path": None},
        "training": copy.deepcopy(TRAINING),
    }
    cfg = copy.deepcopy(defaults)
    for section, values in raw.items():
        if values is not None and not isinstance(values, dict):
            raise MemfitError(f"config section {section!r} must be a mapping of keys to values, got {values!r}.")
    items = [(f"{section}.{k}", v) for section, values in raw.items() for k, v in (values or {}).items()]
    items += list(overrides.items())
    for key, value in items:
        section, _, field = key.partition(".")
        if section not in defaults:
            raise MemfitError(f"unknown config section {section!r} in {key!r}; sections: model, data, training.")
        if field not in defaults[section]:
            raise MemfitError(f"unknown config key {key!r}; keys of {section}: {', '.join(defaults[section])}.")
        default = defaults[section][field]
        cfg[section][field] = value if field in FLEXIBLE or key == "data.path" else _coerce(key, value, default)
    t = cfg["training"]
    for key in ("batch_size", "max_iters", "log_interval", "eval_interval", "eval_iters"):
        if t[key] < 1:
            raise MemfitError(f"training.{key} must be at least 1, got {t[key]}.")
    if t["distributed"] not in DISTRIBUTED:
        raise MemfitError(
            f"training.distributed {t['distributed']!r} is not one of {', '.join(DISTRIBUTED)}; "
            f"ddp and fsdp run under torchrun."
        )
    for key, parse in (("gradient_checkpointing", schedule.parse), ("memory_budget", schedule.Budget.parse)):
        if t[key] is not None:
            try:
                parse(t[key])  # a bad value fails before any work
            except MemfitError as e:
                raise MemfitError(f"training.{key}: {e}") from None
    if t["precision"] not in PRECISIONS:
        raise MemfitError(f"training.precision {t['precision']!r} is not one of {', '.join(PRECISIONS)}.")
    return cfg


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
