"""CalvinSimEnv against a fake ``calvin_env`` / ``calvin_agent`` package tree built in the test (same module
paths, function names and return shapes as the GitHub packages), so the adapter's real code runs: obs layout,
reset from initial states, action passing, oracle and instruction loading, chain sources, crash recovery.

The scripted simulator: every step adds ``2 * 0.5 * action[0]`` to a "progress" counter (calvin_env scales
actions in place; the fake does too, by 0.5); task ``t: [progress_over, k]`` succeeds once progress grew by k
since the subtask began. ``merged_config.yaml`` sets the camera sizes and which env instances crash when.
"""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.calvin_rollout import CalvinRolloutDataModule
from teachers.base import ActionOutput
from vitavla.errors import ConfigError, MissingDependencyError
from vitavla.layouts import calvin_state as to_state
from vitavla.rollout import pyhash_compat
from vitavla.rollout.calvin_env import (CalvinSimEnv, env_state, load_calvin_chains, load_instructions,
                                        load_task_oracle, main, write_chains)
from vitavla.rollout.calvin_protocol import evaluate_calvin, run_chain

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


# -- tests ---------------------------------------------------------------------------------------------------
@pytest.fixture
def fake(tmp_path, monkeypatch):
    paths = build_fake(tmp_path)
    install_fake(monkeypatch, paths)
    yield paths
    forget()


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


def test_obs_layout_reset_state_and_action_passing(fake):
    env = CalvinSimEnv(str(fake["dataset"]))  # the dataset root; conf from the installed calvin_agent
    assert env.validation_dir == fake["dataset"] / "validation" and instances() == []  # simulator is lazy
    robot = np.arange(15, dtype=np.float64) / 10
    robot[14] = -1.0  # gripper closed
    scene = np.arange(24, dtype=np.float64)
    obs = env.reset({"robot_obs": robot.tolist(), "scene_obs": scene.tolist()})
    (sim,) = instances()
    np.testing.assert_array_equal(sim.resets[0][0], robot)
    np.testing.assert_array_equal(sim.resets[0][1], scene)
    assert obs.static.shape == (200, 200, 3) and obs.wrist.shape == (84, 84, 3)
    assert obs.static[0, 0, 0] == 10 and obs.wrist[0, 0, 0] == 7  # rgb_static -> static, rgb_gripper -> wrist
    # CalvinDataModule's state: robot_obs[0:6] + gripper -1/+1 -> 0/1.
    assert obs.state.tolist() == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.0])
    np.testing.assert_array_equal(obs.state, to_state(robot[None].astype(np.float32))[0])

    action = np.array([0.5, 0, 0, 0, 0, 0, 0.7], dtype=np.float32)
    obs, info = env.step(action)
    assert sim.actions[0].tolist() == [0.5, 0, 0, 0, 0, 0, 1.0]  # float64, gripper snapped to +1
    assert action.tolist() == pytest.approx([0.5, 0, 0, 0, 0, 0, 0.7])  # the caller's array is untouched
    assert obs.state[6] == 1.0 and obs.state[0] == pytest.approx(0.25)  # open now; moved by the scaled action
    assert info["scene_info"]["progress"] == pytest.approx(0.5) and env.get_info() == info
    env.step(np.array([0, 0, 0, 0, 0, 0, 0.0]))
    assert sim.actions[1][6] == -1.0  # gripper 0 (normalized "close") -> -1
    with pytest.raises(ValueError, match="7 values"):
        env.step(np.zeros(6))
    env.close()
    assert sim.closed
    env.reset({"robot_obs": robot, "scene_obs": scene})
    assert len(instances()) == 2  # a reset after close starts a fresh simulator


def test_symbolic_initial_state_goes_through_calvin_agent(fake):
    env = CalvinSimEnv(str(fake["dataset"] / "validation"))
    env.reset({"led": 1, "lightbulb": 0, "slider": "right", "drawer": "closed", "red_block": "table",
               "blue_block": "table", "pink_block": "slider_right", "grasped": 0})
    robot, scene = instances()[0].resets[0]
    assert robot[0] == pytest.approx(0.1) and scene[5] == 1.0
    with pytest.raises(ValueError, match=r"robot_obs must have shape \(15,\)"):
        env_state({"robot_obs": [0.0] * 14, "scene_obs": [0.0] * 24})


def test_oracle_and_instructions_come_from_the_config_files(fake):
    env = CalvinSimEnv(str(fake["dataset"]))
    assert env.tasks_config == fake["conf"] / "callbacks/rollout/tasks/new_playtable_tasks.yaml"
    assert env.instructions["open_drawer"] == "open drawer please"  # first phrasing, as the official eval
    assert env.instruction("turn_on_led") == "turn on led please"
    assert env.known_subtasks == set(TASKS)
    start, done, almost = ({"scene_info": {"progress": p}} for p in (1.0, 3.0, 2.9))
    assert env.oracle(start, done, "open_drawer") and not env.oracle(start, almost, "open_drawer")
    with pytest.raises(KeyError, match="new_playtable_validation.yaml"):
        env.instruction("fly")


def test_run_chain_over_the_adapter(tmp_path, monkeypatch):
    paths = build_fake(tmp_path, progress={"open_drawer": 2, "lift_blue_block_table": 3, "push_red_block_left": 99})
    install_fake(monkeypatch, paths)
    try:
        env, policy = CalvinSimEnv(str(paths["dataset"])), PushPolicy()
        chain = load_calvin_chains(None, 1)[0]  # fake get_sequences: TASKS[0:5] from led 0
        assert chain.subtasks == TASKS[:5]
        res = run_chain(env, policy, chain, env.oracle, env.instructions, ep_len=5)
        assert res.completed == 2 and res.steps == [2, 3, 5]
        (sim,) = instances()
        assert len(sim.resets) == 1 and len(sim.actions) == 10 and policy.resets == 3
        assert policy.instructions[:2] == ["open drawer please"] * 2
        assert policy.instructions[5:] == ["push red block left please"] * 5
    finally:
        forget()


def test_camera_sizes_other_than_calvins_are_refused(tmp_path, monkeypatch):
    paths = build_fake(tmp_path, static=128)
    install_fake(monkeypatch, paths)
    try:
        state = {"robot_obs": np.zeros(15), "scene_obs": np.zeros(24)}
        with pytest.raises(ValueError, match=r"rgb_static \(128, 128, 3\).*\(200, 200, 3\).*merged_config.yaml"):
            CalvinSimEnv(str(paths["dataset"])).reset(state)
        assert CalvinSimEnv(str(paths["dataset"]), check_cameras=False).reset(state).static.shape == (128, 128, 3)
    finally:
        forget()


class _NoCalvin:
    """A meta-path finder that makes calvin_env / calvin_agent unimportable even where the real ones are
    installed (developers who run the ``calvin`` tests have them)."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("calvin_env", "calvin_agent"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def test_clear_errors_without_the_packages_or_files(tmp_path, monkeypatch):
    paths = build_fake(tmp_path)  # files on disk, packages not importable
    forget()
    monkeypatch.setattr(sys, "meta_path", [_NoCalvin(), *sys.meta_path])
    with pytest.raises(ImportError, match=r"calvin_env.*github.com/mees/calvin"):
        CalvinSimEnv(str(paths["dataset"]), conf_dir=str(paths["conf"]))
    with pytest.raises(ValueError, match="pass conf_dir"):
        CalvinSimEnv(str(paths["dataset"]))
    with pytest.raises(FileNotFoundError, match=r"merged_config.yaml.*dataset root"):
        CalvinSimEnv(str(tmp_path / "nowhere"), conf_dir=str(paths["conf"]))
    bad = tmp_path / "tasks.yaml"
    bad.write_text("tasks: {open_drawer: 3}\n")
    with pytest.raises(ValueError, match=r"tasks.yaml: expected|tasks.yaml: tasks \['open_drawer'\]"):
        load_task_oracle(bad)
    ann = tmp_path / "ann.yaml"
    ann.write_text("open_drawer: []\n")
    with pytest.raises(ValueError, match=r"ann.yaml: key 'open_drawer' must be a non-empty list"):
        load_instructions(ann)
    with pytest.raises(ImportError, match="pass a chain file"):
        load_calvin_chains(None, 3)


def test_chain_sources_generate_export_and_pin(fake, tmp_path):
    chains = load_calvin_chains(None, 7)
    assert len(chains) == 7 and chains[1].initial_state["led"] == 1 and chains[1].subtasks == TASKS[1:6]
    path = write_chains(tmp_path / "chains.json", chains, resolve_states=True)
    items = json.loads(path.read_text())
    assert items[1][0]["condition"]["led"] == 1 and items[1][0]["robot_obs"][0] == pytest.approx(0.1)
    pinned = load_calvin_chains(path, 3)
    assert [c.subtasks for c in pinned] == [c.subtasks for c in chains[:3]]
    np.testing.assert_allclose(env_state(pinned[1].initial_state)[1], env_state(chains[1].initial_state)[1])
    assert len(load_calvin_chains(path, None)) == 7
    with pytest.raises(ValueError, match="holds 7 chains, num_chains asks for 10"):
        load_calvin_chains(path, 10)
    out = tmp_path / "exported.json"
    main(["export-chains", str(out), "--num-chains", "4", "--resolve-states"])
    assert len(json.loads(out.read_text())) == 4 and "robot_obs" in json.loads(out.read_text())[3][0]


def test_evaluate_calvin_rebuilds_a_crashed_simulator(tmp_path, monkeypatch):
    paths = build_fake(tmp_path, crash_instances=[0], crash_at=1)  # the first simulator dies at its 2nd step
    install_fake(monkeypatch, paths)
    try:
        chains = load_calvin_chains(None, 3)
        res = evaluate_calvin(lambda: CalvinSimEnv(str(paths["dataset"])), PushPolicy(), chains,
                              tmp_path / "r.jsonl", ep_len=4, progress=False)
        assert res["errors"] == 0 and res["chains"] == 3 and res["avg_seq_len"] == 5.0
        recs = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
        assert [(r["chain"], r["attempt"], r["error"] is None) for r in recs] == [(0, 0, False), (0, 1, True),
                                                                                 (1, 0, True), (2, 0, True)]
        assert "pybullet exploded in env 0" in recs[0]["error"]
        assert instances()[0].closed and len(instances()) == 2
    finally:
        forget()


# -- issue 12: installs without pyhash, chain subsets, errors that are not simulator crashes --------------
def test_pyhash_stand_in_gives_pyhash_fnv1_32_values():
    # The values pyhash's own test suite asserts for fnv1_32: seed 0 (not FNV's offset basis), str as
    # UTF-16-LE.
    h = pyhash_compat.fnv1_32()
    assert h(b"test") == 3698262380 and h("test") == 3910690890
    assert h(b"test", b"test") == 660137056 == h(b"test", seed=3698262380)
    assert h(bytes(range(256))) == 4117514240
    assert pyhash_compat.fnv1_32(seed=7)(b"") == 7
    with pytest.raises(TypeError, match="bytes or str, got int"):
        h(3)


def test_symbolic_states_resolve_through_calvin_agent_without_pyhash_installed(fake):
    state = {"led": 1, "lightbulb": 0, "slider": "right", "drawer": "closed", "red_block": "table",
             "blue_block": "table", "pink_block": "slider_right", "grasped": 0}
    robot, scene = env_state(state)  # the fake utils does `import pyhash` at module level, as the real one
    assert sys.modules["pyhash"].fnv1_32 is pyhash_compat.fnv1_32
    assert scene[6] == pyhash_compat.fnv1_32()(str(state.values())) % 1000 and scene[5] == 1.0


def test_a_chain_subset_is_a_prefix_of_the_official_1000(fake, tmp_path):
    official = [c.subtasks for c in load_calvin_chains(None, 1000)]
    first3 = [c.subtasks for c in load_calvin_chains(None, 3)]
    assert first3 == official[:3] == [TASKS[0:5], TASKS[1:6], [*TASKS[2:6], TASKS[0]]]
    seqs = importlib.import_module("calvin_agent.evaluation.multistep_sequences")
    assert first3 != [list(t) for _, t in seqs.get_sequences(3)]  # what num_chains: 3 used to evaluate
    out = tmp_path / "first3.json"
    main(["export-chains", str(out), "--num-chains", "3"])
    assert [tasks for _, tasks in json.loads(out.read_text())] == official[:3]
    with pytest.raises(ConfigError, match="num_chains=1001: CALVIN's official evaluation set has 1000 chains"):
        load_calvin_chains(None, 1001)


def test_a_broken_calvin_models_install_fails_when_the_datamodule_is_built(tmp_path, monkeypatch):
    paths = build_fake(tmp_path, utils_needs="hydra_absent_here")  # e.g. --no-deps without hydra-core
    install_fake(monkeypatch, paths)
    try:
        env = CalvinSimEnv(str(paths["dataset"]))
        hint = (r"the symbolic initial states of the official chains needs calvin_agent.evaluation.utils "
                r"\(ModuleNotFoundError: No module named 'hydra_absent_here'\)\. calvin_env and calvin_models are "
                r"not on PyPI.*pip install --no-deps -e calvin/calvin_env -e calvin/calvin_models")
        with pytest.raises(MissingDependencyError, match=hint):
            CalvinRolloutDataModule(env, chains=None, num_chains=2)
        pinned = write_chains(tmp_path / "pinned.json", [load_calvin_chains(None, 1)[0]] * 2)  # still symbolic
        with pytest.raises(MissingDependencyError, match=f"symbolic initial states of {pinned}"):
            CalvinRolloutDataModule(env, chains=str(pinned), num_chains=None)
        resolved = tmp_path / "resolved.json"
        resolved.write_text(json.dumps([[{"robot_obs": [0.0] * 15, "scene_obs": [0.0] * 24}, TASKS[:5]]]))
        # Resolved states need no calvin_agent.
        assert len(CalvinRolloutDataModule(env, chains=str(resolved), num_chains=1).chains) == 1
    finally:
        forget()


def test_missing_packages_and_bad_settings_stop_the_evaluation_instead_of_counting_as_crashes(
        tmp_path, monkeypatch):
    paths = build_fake(tmp_path, static=128, utils_needs="hydra_absent_here")
    install_fake(monkeypatch, paths)
    try:
        resolved = [load_calvin_chains(None, 2)[1]]
        resolved = [type(c)({"robot_obs": [0.0] * 15, "scene_obs": [0.0] * 24}, c.subtasks) for c in resolved]
        results = tmp_path / "r.jsonl"
        factory = lambda: CalvinSimEnv(str(paths["dataset"]))  # noqa: E731
        with pytest.raises(ConfigError, match=r"rgb_static \(128, 128, 3\)"):  # a camera setting, every time
            evaluate_calvin(factory, PushPolicy(), resolved, results, ep_len=2, progress=False)
        symbolic = load_calvin_chains(None, 1)  # generated before utils is imported: get_sequences needs none
        with pytest.raises(MissingDependencyError, match="No module named 'hydra_absent_here'"):
            evaluate_calvin(factory, PushPolicy(), symbolic, results, ep_len=2, progress=False)
        assert not results.exists() or results.read_text() == ""  # nothing recorded, nothing to skip on rerun
    finally:
        forget()


def test_close_is_final_so_the_simulators_destructor_does_not_disconnect_again(fake):
    env = CalvinSimEnv(str(fake["dataset"]))
    env.reset({"robot_obs": np.zeros(15), "scene_obs": np.zeros(24)})
    (sim,) = instances()
    env.close()
    sim.__del__()  # what garbage collection runs on PlayTableSimEnv
    assert sim.closed and sim.close_calls == 1


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "calvin"


def test_official_chains_are_checked_and_only_a_verified_set_is_cached(fake, tmp_path, monkeypatch, caplog):
    from vitavla.rollout import calvin_env

    monkeypatch.setattr(calvin_env, "CACHE_DIR", tmp_path / "cache")
    cache = tmp_path / "cache" / calvin_env.CACHE_FILE
    with caplog.at_level("WARNING", logger="vitavla.rollout.calvin_env"):
        fake_chains = load_calvin_chains(None, 2)  # the fake's get_sequences: not the official set
    assert "not CALVIN's official 1000" in caplog.text and not cache.exists()
    # Once generated chains match the official digest they are cached, and later runs need no calvin_models.
    monkeypatch.setattr(calvin_env, "OFFICIAL_CHAINS_SHA256",
                        calvin_env.chains_digest(load_calvin_chains(None, 1000)))
    generated = load_calvin_chains(None, 1000)
    assert cache.is_file()
    assert calvin_env.chains_digest(json.loads(cache.read_text())) == calvin_env.OFFICIAL_CHAINS_SHA256
    forget()
    monkeypatch.setattr(sys, "meta_path", [_NoCalvin(), *sys.meta_path])  # no calvin_models at all now
    assert [c.subtasks for c in load_calvin_chains(None, 2)] == [c.subtasks for c in fake_chains] \
        == [c.subtasks for c in generated[:2]]
    cache.write_text(cache.read_text().replace("open_drawer", "close_drawer"))  # tampered: not used
    with pytest.raises(MissingDependencyError, match="generating the CALVIN chains"):
        load_calvin_chains(None, 2)


def test_chain_digest_of_the_first_official_chains():
    # Pins the canonical form OFFICIAL_CHAINS_SHA256 is computed in (first 20 of eval_sequences_1000.json).
    from vitavla.rollout.calvin_env import chains_digest

    first20 = json.loads((FIXTURES / "official_chains_first20.json").read_text())
    assert len(first20) == 20
    assert chains_digest(first20) == "82c623b903203fdda2efd0a30c4a07c42b45b510dc42eb77b503b9a626901fbc"
    assert chains_digest([[s, tuple(t)] for s, t in first20]) == chains_digest(first20)


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


@pytest.mark.calvin
@pytest.mark.slow
def test_real_calvin_models_without_pyhash_generate_the_official_1000_chains(tmp_path, monkeypatch):
    real_calvin_agent()
    from vitavla.rollout import calvin_env

    monkeypatch.setattr(calvin_env, "CACHE_DIR", tmp_path)  # generate, do not read a cached set
    chains = load_calvin_chains(None, 1000)  # minutes of CPU: get_sequences samples 1000 chains
    assert calvin_env.chains_digest(chains) == calvin_env.OFFICIAL_CHAINS_SHA256
    first20 = json.loads((FIXTURES / "official_chains_first20.json").read_text())
    assert [[c.initial_state, c.subtasks] for c in load_calvin_chains(None, 20)] == first20  # now from the cache
    assert (tmp_path / calvin_env.CACHE_FILE).is_file()


def test_composing_the_sim_config_needs_calvin_envs_conf_next_to_the_package(fake, tmp_path, monkeypatch):
    from vitavla.rollout import calvin_env

    monkeypatch.setattr(calvin_env, "CACHE_DIR", tmp_path / "cache")
    with pytest.raises(MissingDependencyError, match=r"has no conf/scene/calvin_scene_D.yaml or data/.*editable"):
        CalvinSimEnv(None)  # the fake package has no conf/ beside it, as a non-editable install


@pytest.mark.calvin
@pytest.mark.slow
def test_real_calvin_env_without_a_dataset(tmp_path, monkeypatch):
    """The real simulator, configured from calvin_env's own conf (no dataset): observation layout, the scene
    after a reset from a chain's state, the +-1 gripper, the task oracle and a final close."""
    forget()
    if importlib.util.find_spec("calvin_env") is None:
        pytest.skip("calvin_env is not installed; see docs/evaluation.md for the install")
    from vitavla.rollout import calvin_env
    from vitavla.rollout.calvin_env import default_conf_dir

    real_calvin_agent()
    conf = default_conf_dir()
    if conf is None or not (conf / calvin_env.TASKS_CONFIG).is_file():
        pytest.skip("calvin_models is installed without its conf/ (install it editable from the checkout)")
    monkeypatch.setattr(calvin_env, "CACHE_DIR", tmp_path)
    try:
        env = CalvinSimEnv(None)
    except MissingDependencyError as e:
        pytest.skip(f"calvin_env is installed without its conf/ and data/: {e}")
    state = {"led": 1, "lightbulb": 0, "slider": "left", "drawer": "open", "red_block": "table",
             "blue_block": "slider_right", "pink_block": "table", "grasped": 0}
    robot, scene = env_state(state)
    try:
        obs = env.reset({"robot_obs": robot.tolist(), "scene_obs": scene.tolist()})
        assert obs.static.shape == (200, 200, 3) and obs.wrist.shape == (84, 84, 3)
        assert obs.static.dtype == obs.wrist.dtype == np.uint8 and obs.static.std() > 0
        assert obs.state.dtype == np.float32 and obs.state.shape == (7,)
        np.testing.assert_allclose(obs.state[:6], robot[:6], atol=1e-3)  # TCP pose of the chain's state
        assert obs.state[6] == 1.0  # robot_obs[14] = +1: open
        sim_scene = np.asarray(env._env.get_obs()["scene_obs"])
        # slider left (0.28), drawer open (0.22), led on, lightbulb off: the chain's symbolic state
        np.testing.assert_allclose(sim_scene[[0, 1, 4, 5]], [0.28, 0.22, 0.0, 1.0], atol=0.02)
        start = env.get_info()
        obs, info = env.step(np.array([0, 0, 0, 0, 0, 0, -0.3]))  # any gripper value <= 0 closes
        obs, info = env.step(np.array([0, 0, 0, 0, 0, 0, -0.3]))
        assert obs.state[6] == 0.0
        obs, info = env.step(np.array([0, 0, 0, 0, 0, 0, 0.2]))
        assert obs.state[6] == 1.0
        # Nothing was pressed or moved: the oracle reports no subtask done.
        assert not any(env.oracle(start, info, t) for t in ("turn_off_led", "close_drawer", "move_slider_right"))
        # A scripted press of the LED button, driven through env.step with relative actions (at most 2 cm per
        # step): above the button, then down onto it. The oracle must report turn_off_led, and nothing else.
        button = env._env.scene.buttons[0]
        target = np.array(env._env.p.getLinkState(button.uid, button.joint_index,
                                                  physicsClientId=env._env.cid)[0])
        start, pressed = env.get_info(), None
        for t in range(120):
            goal = target + [0, 0, 0.06 if t < 60 else -0.03]
            action = np.zeros(7)
            action[:3], action[6] = np.clip((goal - obs.state[:3]) / 0.02, -1, 1), -1
            obs, info = env.step(action)
            if env.oracle(start, info, "turn_off_led"):
                pressed = t
                break
        assert pressed is not None and pressed >= 60, "the oracle never saw the LED turned off by the press"
        assert not any(env.oracle(start, info, t) for t in ("turn_on_led", "close_drawer", "move_slider_right"))
        assert np.asarray(env._env.get_obs()["scene_obs"])[5] == 0.0  # scene_obs[5]: the LED (green light), off
    finally:
        sim = env._env
        env.close()
    assert env._env is None and sim.close() is None  # closed for good: a second close is a no-op


def test_calvin_adapter_imports_stay_free_of_lightning():
    # CALVIN simulator workers import this adapter; its state layout once came from datamodules.calvin, which
    # pulled datamodules.base and Lightning into every worker. The layout now lives in vitavla.layouts.
    import subprocess

    code = ("import sys, vitavla.rollout.calvin_env; "
            "print(sorted(m for m in ('lightning', 'datamodules') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
