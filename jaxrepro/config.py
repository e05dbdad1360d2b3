"""Config as code: load `get_config()` from a Python file, apply typed overrides.

Config files are Python and are *executed* when loaded: only load files you trust.
`experiments/convnet.py` calls `get_config()`; `experiments/convnet.py:tiny` calls
`get_config("tiny")`, a variant the file defines (as big_vision's `config.py:arg`).
Overrides look like `--config.optimizer.learning_rate=0.01`; a key that does not
exist or a value of the wrong type is an error that names the valid keys.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ml_collections

from jaxrepro.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be used, with a message saying why."""


def split_spec(spec: str | Path) -> tuple[Path, str | None]:
    """(file, variant) of `path.py` or `path.py:variant`."""
    text = str(spec)
    head, sep, tail = text.rpartition(":")
    if sep and head.endswith(".py") and tail and "/" not in tail:
        return Path(head), tail
    return Path(text), None


def load_file(spec: str | Path) -> ml_collections.ConfigDict:
    """Execute a config file and return its `get_config()` or `get_config(variant)`."""
    path, variant = split_spec(spec)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"jaxrepro_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the file is user code: report any failure clearly
        raise ConfigError(f"config file {path} failed to execute: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config() function")
    try:
        config = module.get_config() if variant is None else module.get_config(variant)
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"{path}: get_config({variant!r}) failed: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(
            f"{path}: get_config() returned {type(config).__name__}, "
            "expected ml_collections.ConfigDict"
        )
    return config


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All leaf keys of a config as dotted paths, sorted."""
    keys = []
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            keys += flat_keys(v, f"{prefix}{k}.")
        else:
            keys.append(f"{prefix}{k}")
    return sorted(keys)


def _parse(text: str, current: Any, key: str) -> Any:
    """Parse an override string into the type of the value it replaces."""
    kind = type(current)
    try:
        if kind is bool:
            low = text.lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError(text)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is str:
            return text
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(
            f"--config.{key}={text!r}: expected a value of type "
            f"{kind.__name__} (current value {current!r})"
        ) from None
    if current is not None and not isinstance(value, kind):
        raise ConfigError(
            f"--config.{key}={text!r}: expected {kind.__name__}, got {type(value).__name__}"
        )
    return value


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Iterable[str]
) -> ml_collections.ConfigDict:
    """Apply `key=value` overrides (without the `--config.` prefix), type-checked."""
    config = ml_collections.ConfigDict(config.to_dict())  # a copy we may change
    valid = flat_keys(config)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} has no '=': write --config.{key}=VALUE")
        if key not in valid:
            raise ConfigError(f"unknown config key {key!r}. Valid keys:\n  " + "\n  ".join(valid))
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = _parse(text, node[leaf], key)
    return config


def resolve(spec: str | Path, overrides: Iterable[str] = ()) -> ml_collections.FrozenConfigDict:
    """Load (`path.py` or `path.py:variant`), override and freeze a config."""
    return ml_collections.FrozenConfigDict(apply_overrides(load_file(spec), overrides))


def to_json(config: ml_collections.ConfigDict) -> str:
    """Canonical JSON of a config (sorted keys): what is saved and hashed."""
    return json.dumps(ml_collections.ConfigDict(config).to_dict(), sort_keys=True, indent=2)


def config_hash(config: ml_collections.ConfigDict) -> str:
    """SHA-256 of the canonical JSON of a config."""
    return hashlib.sha256(to_json(config).encode()).hexdigest()


def diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out
