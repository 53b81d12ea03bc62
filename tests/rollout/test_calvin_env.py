"""CalvinSimEnv against a fake ``calvin_env`` / ``calvin_agent`` package tree (tests/rollout/fake_calvin.py), so
the adapter's real code runs: obs layout, reset from initial states, action passing, oracle and instruction
loading, crash recovery, errors that are not simulator crashes. Chain sources: test_calvin_chains.py.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.rollout.fake_calvin import (TASKS, NoCalvin, PushPolicy, build_fake, forget, install_fake, instances,
                                       real_calvin_agent)
from vitavla.errors import ConfigError, MissingDependencyError
from vitavla.layouts import calvin_state as to_state
from vitavla.rollout.calvin_env import CalvinSimEnv, env_state, load_calvin_chains, load_instructions, load_task_oracle
from vitavla.rollout.calvin_protocol import evaluate_calvin, run_chain


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


def test_clear_errors_without_the_packages_or_files(tmp_path, monkeypatch):
    paths = build_fake(tmp_path)  # files on disk, packages not importable
    forget()
    monkeypatch.setattr(sys, "meta_path", [NoCalvin(), *sys.meta_path])
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
