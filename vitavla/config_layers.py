"""Training configs layered the way ``vitavla fit --config A --config B`` layers them, read without running
anything: YAML is parsed safely and classes are only imported (for the ``init_args`` a swapped class
accepts), never instantiated. Used by ``vitavla plan``."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from vitavla.errors import ConfigError


def import_class(class_path: str, key: str):
    """The class at ``class_path``; a ConfigError naming ``key`` when it cannot be imported."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{key}.class_path: cannot import {class_path!r} ({err})") from err


def _same_class(a: str, b: str) -> bool:
    # jsonargparse resolves a bare class name against the known subclasses; "TensorBoardLogger" and
    # "lightning.pytorch.loggers.TensorBoardLogger" are the same class for layering.
    return a == b or a.rpartition(".")[2] == b or b.rpartition(".")[2] == a


def _accepted_init_args(class_path: str, init_args: dict, key: str) -> dict:
    """The ``init_args`` the class at ``class_path`` accepts: what jsonargparse keeps when a later config
    swaps the class of a ``{class_path, init_args}`` node."""
    cls = import_class(class_path, key)
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(init_args)
    return {k: v for k, v in init_args.items() if k in params}


def merge_configs(base: dict, override: dict, key: str = "") -> dict:
    """``override`` layered over ``base`` the way ``vitavla fit --config base --config override`` layers them
    (jsonargparse): mappings merge key by key, anything else (scalars, lists) is replaced; a node whose
    ``class_path`` changes keeps only the earlier ``init_args`` the new class accepts. Neither input is
    modified."""
    out = dict(base)
    new_class = override.get("class_path")
    if (isinstance(base.get("class_path"), str) and isinstance(new_class, str)
            and not _same_class(base["class_path"], new_class)):
        where = key or "config"
        out = {"class_path": new_class,
               "init_args": _accepted_init_args(new_class, dict(base.get("init_args") or {}), where)}
    for name, value in override.items():
        sub = f"{key}.{name}" if key else str(name)
        if isinstance(value, dict) and isinstance(out.get(name), dict):
            out[name] = merge_configs(out[name], value, sub)
        else:
            out[name] = value
    return out


def load_configs(paths: list[str | Path]) -> dict:
    """Read and layer YAML training configs, later over earlier; ConfigError naming the file on bad input."""
    import yaml

    if not paths:
        raise ConfigError("--config: at least one training YAML is needed")
    merged: dict = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise ConfigError(f"--config {path}: not found")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"--config {path}: not valid YAML ({err})") from err
        if data is None:
            continue
        if not isinstance(data, dict):
            raise ConfigError(f"--config {path}: expected a mapping of sections (trainer, model, data), "
                              f"got {type(data).__name__}")
        try:
            merged = merge_configs(merged, data)
        except ConfigError as err:
            raise ConfigError(f"--config {path}: {err}") from err
    return merged


__all__ = ["import_class", "load_configs", "merge_configs"]
