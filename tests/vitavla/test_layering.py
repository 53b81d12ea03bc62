"""The core package's shared types, their old import paths, and the direction of imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("old,new", [
    ("datamodules.normalization:Normalizer", "vitavla.normalizer:Normalizer"),
    ("teachers.base:ActionOutput", "vitavla.action_head:ActionOutput"),
    ("teachers.base:ActionHead", "vitavla.action_head:ActionHead"),
    ("vitavla.streaming:Observation", "vitavla.observation:Observation"),
    ("vitavla.rollout.runner:EpisodeSpec", "vitavla.rollout.episode:EpisodeSpec"),
    ("vitavla.rollout.runner:EpisodeResult", "vitavla.rollout.episode:EpisodeResult"),
    ("vitavla.rollout.runner:to_observation", "vitavla.rollout.episode:to_observation"),
    ("datamodules.calvin:ROBOT", "vitavla.layouts:CALVIN_ROBOT"),
])
def test_old_import_paths_are_the_moved_objects(old, new):
    # YAML class_paths, pickles and user code name the old paths; they must give the very same object.
    import importlib

    def resolve(path):
        module, name = path.split(":")
        return getattr(importlib.import_module(module), name)

    assert resolve(old) is resolve(new)


def _imports(path: Path) -> set[str]:
    """Top-level package names a module imports, anywhere in it (function-local imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", ["vitavla/rollout", "vitavla/serving"])
def test_rollout_and_serving_do_not_import_datamodules(package):
    # Data readers sit beside the teachers, below rollouts: a rollout that imports datamodules pulls the
    # readers (and Lightning) into simulator workers and closes a circle with datamodules.rollout.
    offenders = [str(p.relative_to(ROOT)) for p in sorted((ROOT / package).glob("*.py"))
                 if "datamodules" in _imports(p)]
    assert offenders == []


@pytest.mark.parametrize("module", ["normalizer", "action_head", "observation", "layouts", "batch", "images"])
def test_core_types_import_only_the_core(module):
    assert _imports(ROOT / "vitavla" / f"{module}.py") & {"datamodules", "teachers", "cli", "lightning"} == set()


def test_nothing_below_cli_imports_it():
    # cli.py is the top: the quickstart and the serving commands build their trainer through
    # vitavla.lightning_cli, which cli.py re-exports, so no circle runs through the command.
    offenders = [str(p.relative_to(ROOT)) for package in ("vitavla", "teachers", "datamodules")
                 for p in sorted((ROOT / package).rglob("*.py")) if "cli" in _imports(p)]
    assert offenders == []


def test_cli_re_exports_the_builder():
    import cli
    from vitavla import lightning_cli

    assert cli.build_cli is lightning_cli.build_cli and cli.vita_cli_class is lightning_cli.vita_cli_class
