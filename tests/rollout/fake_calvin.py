"""A fake ``calvin_env`` / ``calvin_agent`` package tree for the CALVIN tests (test_calvin_env.py,
test_calvin_chains.py, test_eval_configs.py): the same module paths, function names and return shapes as the
GitHub packages, so CalvinSimEnv's real code runs against it.

The scripted simulator: every step adds ``2 * 0.5 * action[0]`` to a "progress" counter (calvin_env scales
actions in place; the fake does too, by 0.5); task ``t: [progress_over, k]`` succeeds once progress grew by k
since the subtask began. ``merged_config.yaml`` sets the camera sizes and which env instances crash when.
The ``fake`` fixture (tests/rollout/conftest.py) builds and installs it for one test.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vitavla.action_head import ActionOutput
from vitavla.errors import MissingDependencyError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "calvin"

TASKS = ["open_drawer", "lift_blue_block_table", "push_red_block_left", "turn_on_led", "close_drawer",
         "move_slider_left"]

ENV_SRC = '''
import numpy as np
import yaml
from pathlib import Path

INSTANCES = []   # every env built, in order (tests read resets / actions from them)


class FakePlayTableEnv:
    def __init__(self, cfg, index):
        self.cfg, self.index = cfg, index
        self.resets, self.actions, self.closed, self.t, self.close_calls = [], [], False, 0, 0
        self.robot_obs, self.scene_obs, self.progress = None, None, 0.0

    def _obs(self):
        s, w = self.cfg["static"], self.cfg["gripper"]
        static = np.full((s, s, 3), 10 + self.t % 200, dtype=np.uint8)
        gripper = np.full((w, w, 3), 7, dtype=np.uint8)
        return {"rgb_obs": {"rgb_static": static, "rgb_gripper": gripper}, "depth_obs": {},
                "robot_obs": self.robot_obs.copy(), "scene_obs": self.scene_obs.copy()}

    def reset(self, robot_obs=None, scene_obs=None):
        assert robot_obs.shape == (15,) and scene_obs.shape == (24,)
        self.resets.append((robot_obs.copy(), scene_obs.copy()))
        self.robot_obs, self.scene_obs, self.progress, self.t = robot_obs.copy(), scene_obs.copy(), 0.0, 0
        return self._obs()

    def get_info(self):
        return {"robot_info": {"uid": 1, "gripper_action": self.robot_obs[14]},
                "scene_info": {"progress": self.progress}}

    def step(self, action):
        assert not self.closed
        assert action.dtype == np.float64 and action.shape == (7,)
        assert action[6] in (-1, 1)  # as calvin_env's Robot.apply_action
        if self.index in self.cfg.get("crash_instances", []) and self.t == self.cfg.get("crash_at", 0):
            raise RuntimeError(f"pybullet exploded in env {self.index}")
        self.actions.append(action.copy())
        action[:6] *= 0.5  # calvin_env scales the relative action in place: the caller's array must not change
        self.t += 1
        self.progress += float(action[0]) * 2
        self.robot_obs[:3] += action[:3]
        self.robot_obs[14] = action[6]
        return self._obs(), 0, False, self.get_info()

    def close(self):
        self.close_calls += 1
        if self.closed:  # pybullet.error: Not connected -- a second disconnect of the same client
            raise RuntimeError("Not connected to physics server")
        self.closed = True

    def __del__(self):  # as PlayTableSimEnv
        self.close()


def get_env(dataset_path, obs_space=None, show_gui=True, **kwargs):
    cfg = yaml.safe_load((Path(dataset_path) / ".hydra" / "merged_config.yaml").read_text())
    env = FakePlayTableEnv(cfg, len(INSTANCES))
    INSTANCES.append(env)
    return env
'''

TASKS_SRC = '''
from functools import partial


class Tasks:
    def __init__(self, tasks):
        self.tasks = {name: partial(getattr(self, args[0]), *args[1:]) for name, args in dict(tasks).items()}

    def get_task_info_for_set(self, start_info, end_info, task_filter):
        return {n for n, f in self.tasks.items() if n in task_filter and f(start_info=start_info, end_info=end_info)}

    @staticmethod
    def progress_over(amount, start_info, end_info):
        return end_info["scene_info"]["progress"] - start_info["scene_info"]["progress"] >= amount
'''

UTILS_SRC = '''
{extra_import}
import numpy as np
import pyhash  # as calvin_agent.evaluation.utils: at module level (pyhash does not build on Python 3.11)

hasher = pyhash.fnv1_32()


def get_env_state_for_initial_condition(initial_condition):
    robot_obs = np.zeros(15)
    robot_obs[14] = 1.0
    robot_obs[0] = 0.1 * initial_condition["led"]
    scene_obs = np.zeros(24)
    scene_obs[5] = initial_condition["led"]
    scene_obs[6] = hasher(str(initial_condition.values())) % 1000  # calvin_agent's block-shuffle seed
    return robot_obs, scene_obs
'''

SEQ_SRC = '''
TASKS = {tasks!r}


def get_sequences(num_sequences=1000, num_workers=None):
    # Like the real one, fewer sequences are not the first ones of the 1000: here they are shifted by n.
    shift = num_sequences % 1000
    out = []
    for i in range(num_sequences):
        state = {{"led": i % 2, "lightbulb": 0, "slider": "right", "drawer": "closed", "red_block": "table",
                 "blue_block": "table", "pink_block": "slider_right", "grasped": 0}}
        out.append((state, tuple(TASKS[(i + shift + j) % len(TASKS)] for j in range(5))))
    return out
'''


def build_fake(root: Path, static: int = 200, gripper: int = 84, crash_instances=(), crash_at: int = 0,
          progress: dict | None = None, utils_needs: str | None = None) -> dict:
    """Write the packages, a dataset folder and the calvin_models conf under ``root``; returns their paths.

    ``progress``: subtask -> progress needed (default 2.0 each). ``utils_needs``: a module that
    ``calvin_agent.evaluation.utils`` imports first (a missing one makes a broken calvin_models install)."""
    pkg = root / "site"
    files = {
        "calvin_env/__init__.py": "",
        "calvin_env/envs/__init__.py": "",
        "calvin_env/envs/play_table_env.py": ENV_SRC,
        "calvin_env/envs/tasks.py": TASKS_SRC,
        "calvin_models/calvin_agent/__init__.py": "",
        "calvin_models/calvin_agent/evaluation/__init__.py": "",
        "calvin_models/calvin_agent/evaluation/utils.py": UTILS_SRC.format(
            extra_import=f"import {utils_needs}" if utils_needs else ""),
        "calvin_models/calvin_agent/evaluation/multistep_sequences.py": SEQ_SRC.format(tasks=TASKS),
    }
    for rel, src in files.items():
        p = pkg / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(src))
    progress = progress or {}
    conf = pkg / "calvin_models" / "conf"
    (conf / "callbacks/rollout/tasks").mkdir(parents=True)
    (conf / "annotations").mkdir(parents=True)
    (conf / "callbacks/rollout/tasks/new_playtable_tasks.yaml").write_text(
        "_target_: calvin_env.envs.tasks.Tasks\ntasks:\n" +
        "".join(f"  {t}: [progress_over, {progress.get(t, 2.0)}]\n" for t in TASKS))
    (conf / "annotations/new_playtable_validation.yaml").write_text(
        "".join(f"{t}: [\"{t.replace('_', ' ')} please\", \"another phrasing\"]\n" for t in TASKS))
    dataset = root / "task_D_D"
    (dataset / "validation/.hydra").mkdir(parents=True)
    (dataset / "validation/.hydra/merged_config.yaml").write_text(
        f"static: {static}\ngripper: {gripper}\ncrash_instances: {list(crash_instances)}\ncrash_at: {crash_at}\n")
    return {"site": pkg, "models": pkg / "calvin_models", "conf": conf, "dataset": dataset}


def install_fake(monkeypatch, paths: dict) -> None:
    """Put the fake packages on sys.path (undone by monkeypatch) and forget any earlier import of them."""
    monkeypatch.syspath_prepend(str(paths["site"]))
    monkeypatch.syspath_prepend(str(paths["models"]))
    forget()


def forget() -> None:
    for name in [m for m in sys.modules if m.split(".")[0] in ("calvin_env", "calvin_agent")]:
        del sys.modules[name]


def instances():
    return importlib.import_module("calvin_env.envs.play_table_env").INSTANCES


class PushPolicy:
    """Commands x velocity ``v`` (progress +v per step in the fake) and an open gripper."""

    def __init__(self, v=1.0, logit=4.0):
        self.v, self.logit, self.resets, self.instructions = v, logit, 0, []

    def reset(self):
        self.resets += 1

    def step(self, obs):
        self.instructions.append(obs.instruction[0])
        arm = torch.zeros(1, 3, 6)
        arm[..., 0] = self.v
        return ActionOutput(arm, torch.full((1, 3, 1), self.logit))


class NoCalvin:
    """A meta-path finder that makes calvin_env / calvin_agent unimportable even where the real ones are
    installed (developers who run the ``calvin`` tests have them)."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("calvin_env", "calvin_agent"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def real_calvin_agent():
    """The installed calvin_models' chain generator, or a skip (GitHub-only package, see docs/evaluation.md)."""
    forget()
    if importlib.util.find_spec("calvin_agent") is None:
        pytest.skip("calvin_models (calvin_agent) is not installed; see docs/evaluation.md for the install")
    from vitavla.rollout.calvin_env import _import

    try:
        return _import("calvin_agent.evaluation.multistep_sequences", "this test")
    except MissingDependencyError as e:
        pytest.fail(f"calvin_agent is installed but does not import: {e}")
