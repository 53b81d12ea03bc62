"""The core package's shared types, their old import paths, and the direction of imports."""

from __future__ import annotations

import ast
import subprocess
import sys
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
    ("datamodules:RolloutDataModule", "vitavla.rollout.datamodule:RolloutDataModule"),
    ("datamodules.rollout:RolloutDataModule", "vitavla.rollout.datamodule:RolloutDataModule"),
    ("datamodules.calvin_rollout:CalvinRolloutDataModule", "vitavla.rollout.calvin_datamodule:CalvinRolloutDataModule"),
    ("vitavla.rollout.runner:result_record", "vitavla.rollout.records:result_record"),
])
def test_old_import_paths_are_the_moved_objects(old, new):
    # YAML class_paths, pickles and user code name the old paths; they must give the very same object.
    import importlib

    def resolve(path):
        module, name = path.split(":")
        return getattr(importlib.import_module(module), name)

    assert resolve(old) is resolve(new)


def _modules(path: Path) -> set[str]:
    """Dotted names of the modules a module imports, anywhere in it (function-local imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out


def _imports(path: Path) -> set[str]:
    """Top-level package names a module imports, anywhere in it (function-local imports included)."""
    return {m.split(".")[0] for m in _modules(path)}


def _loaded_after(statement: str, prefixes: tuple[str, ...]) -> list[str]:
    """Modules starting with one of ``prefixes`` that ``statement`` loads, in a fresh interpreter."""
    code = (f"import sys; {statement}; "
            f"print(sorted(m for m in sys.modules if m.startswith({prefixes!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return eval(out.stdout.strip())


@pytest.mark.parametrize("package", ["vitavla/rollout", "vitavla/serving"])
def test_rollout_and_serving_do_not_import_datamodules(package):
    # Data readers sit beside the teachers, below rollouts: a rollout that imports datamodules pulls the
    # readers (and Lightning) into simulator workers, and would close a circle with any datamodule that
    # imported a rollout.
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


def test_datamodules_import_nothing_of_the_layers_above():
    # The rollout datamodules (they attach the rollout callbacks and take simulator adapters) live in
    # vitavla/rollout/; datamodules/ keeps only lazy names for old class_paths, which import nothing.
    above = ("vitavla.rollout", "vitavla.modules", "vitavla.serving")
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in _modules(p) if m.startswith(above))
                 for p in sorted((ROOT / "datamodules").rglob("*.py"))}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_datamodules_loads_no_rollout_module():
    statement = "import datamodules, datamodules.rollout, datamodules.calvin_rollout, datamodules.calvin"
    assert _loaded_after(statement, ("vitavla.rollout", "vitavla.modules")) == []


def test_the_rollout_datamodule_old_name_resolves_on_use():
    # What jsonargparse does with `class_path: datamodules.RolloutDataModule` (configs/quickstart/eval.yaml).
    loaded = _loaded_after("import datamodules; datamodules.RolloutDataModule",
                           ("vitavla.rollout.datamodule", "vitavla.rollout.lightning"))
    assert loaded == ["vitavla.rollout.datamodule", "vitavla.rollout.lightning"]


@pytest.mark.parametrize("module", ["parallel", "episode", "env", "env_worker", "executors", "records"])
def test_the_runner_sits_above_the_batched_loop_without_a_circle(module):
    # runner.py builds on parallel.py (evaluate's num_envs > 1); nothing it builds on may import it back,
    # not even inside a function, and none of them needs Lightning's callback.
    imported = _modules(ROOT / "vitavla" / "rollout" / f"{module}.py")
    assert imported & {"vitavla.rollout.runner", "vitavla.rollout.lightning", "vitavla.rollout"} == set()


def test_the_policy_protocol_is_a_core_module():
    imported = _modules(ROOT / "vitavla" / "policy_protocol.py")
    assert {m.split(".")[0] for m in imported} <= {"__future__", "sys", "typing", "vitavla"}
    assert not any(m.startswith(("vitavla.rollout", "vitavla.modules", "vitavla.serving")) for m in imported)


def _test_module_imports(path: Path) -> list[str]:
    """``line: statement`` of each import in ``path`` that names a module called test_* (relative and
    function-local imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]  # ``from .test_y import z`` too: relative
            if node.level or modules[0].split(".")[0] == "tests":  # ``from tests.x import test_y``: a module
                modules += [f"{modules[0]}.{a.name}" for a in node.names]
        else:
            continue
        if any(part.startswith("test_") for m in modules for part in m.split(".")):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_test_module_imports_another_test_module():
    # Tests mirror the package layout: a builder two test modules share lives in the conftest.py of the
    # narrowest package holding both (tests/, tests/vitavla/, tests/datamodules/, ...), fixtures there need no
    # import, and a test module never imports another one (moving or renaming one would break the other).
    offenders = {str(p.relative_to(ROOT)): found for p in sorted((ROOT / "tests").rglob("*.py"))
                 if (found := _test_module_imports(p))}
    assert offenders == {}


def test_no_module_imports_a_private_name_of_another_project_module():
    # A helper another module needs is part of its module's interface: it gets a public name (or moves next
    # to its users), so that renaming a private helper can never break a distant import.
    found = []
    for path in [ROOT / "cli.py", *(p for pkg in ("vitavla", "teachers", "datamodules")
                                    for p in sorted((ROOT / pkg).rglob("*.py")))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and node.module.split(".")[0] in ("vitavla", "teachers", "datamodules", "cli"):
                found += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, found
