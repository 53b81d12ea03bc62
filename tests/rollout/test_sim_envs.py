"""Real simulators (extra ``sim``): LIBERO and gym-aloha adapters, and one short closed-loop LIBERO rollout.

Kept short (~1 min on 2 cores): env creation costs ~6-13 s, a step ~0.2-0.45 s.
"""

import pickle
import time

import numpy as np
import pytest

pytestmark = pytest.mark.sim


def test_libero_env_and_runner():
    pytest.importorskip("libero.libero")
    from tests.conftest import tiny_policy
    from vitavla.policy_protocol import as_rollout_policy
    from vitavla.rollout.executors import FirstActionExecutor
    from vitavla.rollout.libero_env import LiberoEnv, quat2axisangle
    from vitavla.rollout.runner import EpisodeSpec, run_episode

    from robosuite.utils.transform_utils import quat2axisangle as robosuite_q2aa
    for q in np.random.default_rng(0).normal(size=(4, 4)):
        q /= np.linalg.norm(q)
        np.testing.assert_allclose(quat2axisangle(q), robosuite_q2aa(q.copy()), atol=1e-12)

    env = LiberoEnv("libero_10", protocol="seer", settle_steps=1, max_steps=3)
    try:
        assert (env.num_tasks, env.action_dim, env.max_steps, env.trials_per_task) == (10, 7, 3, 20)
        assert env.render_size == 128 and not env.flip_images
        obs = env.reset(0, 0)
        assert obs.static.shape == obs.wrist.shape == (128, 128, 3) and obs.static.dtype == np.uint8
        assert obs.state.shape == (8,) and obs.state.dtype == np.float32
        assert obs.instruction == "put both the alphabet soup and the tomato sauce in the basket"
        start = time.perf_counter()
        for t in range(3):
            obs, done, success, info = env.step(np.zeros(7))
            assert not success and done == (t == 2) and info["step"] == t + 1
        sim_step = (time.perf_counter() - start) / 3

        policy = as_rollout_policy(tiny_policy("internvl", gripper_state="width", gripper_state_dim=2))
        res = run_episode(env, policy, FirstActionExecutor(), EpisodeSpec(0, 1), image_size=224)
    finally:
        env.close()
    assert res.error is None and res.steps == 3 and res.seconds_sim > 0 and res.seconds_policy > 0
    # res.seconds_sim also holds reset + settle (~3-5 s), so the bare step time is measured above.
    print(f"\nLIBERO 128px: {sim_step:.3f} s per sim step, {res.seconds_policy / res.steps:.3f} s per policy "
          f"step (tiny policy, CPU); episode sim incl. reset {res.seconds_sim:.1f} s")


def test_libero_soft_reset_replays_the_hard_resets_episodes_bit_for_bit():
    """LiberoEnv's default soft reset against LIBERO's hard reset: after an episode that closed the gripper,
    the next episode's frames and states are identical, and the reset is several times cheaper."""
    pytest.importorskip("libero.libero")
    from vitavla.rollout.libero_env import LiberoEnv

    actions = np.random.default_rng(0).uniform(-1, 1, (12, 7))
    actions[:, 6] = np.where(np.arange(12) < 6, -1.0, 1.0)  # open, then close: the gripper keeps a command
    runs = {}
    for hard in (True, False):
        env = LiberoEnv("libero_object", protocol="seer", render_size=32, settle_steps=2, settle_action="noop",
                        max_steps=20, fast_render=True, mesh_lod=True, hard_reset=hard)
        try:
            episodes, reset_s = [], []
            for init_state in (3, 4):
                start = time.perf_counter()
                obs = env.reset(0, init_state)
                reset_s.append(time.perf_counter() - start)
                seen = [(obs.static.copy(), obs.wrist.copy(), obs.state.copy())]
                for a in actions:
                    obs = env.step(a)[0]
                    seen.append((obs.static.copy(), obs.wrist.copy(), obs.state.copy()))
                episodes.append(seen)
            runs[hard] = episodes, reset_s[1]  # the second reset: the first one builds the env either way
        finally:
            env.close()
    (hard_eps, hard_s), (soft_eps, soft_s) = runs[True], runs[False]
    for hard_ep, soft_ep in zip(hard_eps, soft_eps):
        for (hs, hw, hx), (ss, sw, sx) in zip(hard_ep, soft_ep):
            np.testing.assert_array_equal(ss, hs)
            np.testing.assert_array_equal(sw, hw)
            np.testing.assert_array_equal(sx, hx)
    # The closing gripper moved the fingers, so the second episode really started after a changed state.
    assert not np.array_equal(hard_eps[0][-1][2][-2:], hard_eps[0][0][2][-2:])
    assert soft_s < 0.5 * hard_s, (soft_s, hard_s)


def test_libero_openvla_preset_flips():
    pytest.importorskip("libero.libero")
    from vitavla.rollout.libero_env import LiberoEnv

    env = LiberoEnv("libero_spatial", render_size=64, settle_steps=0, gripper_state="binary")
    assert (env.max_steps, env.trials_per_task, env.flip_images, env.settle_steps) == (220, 50, True, 0)
    assert env.settle_action.tolist() == [0, 0, 0, 0, 0, 0, -1]
    try:
        obs = env.reset(0, 0)
        raw = env._env.env._get_observations()  # the simulator's own (upside-down) render of the same state
        np.testing.assert_array_equal(obs.static, raw["agentview_image"][::-1, ::-1])
        assert obs.state.shape == (7,) and obs.state[-1] == 1.0  # starts open
        obs = env.step(np.array([0, 0, 0, 0, 0, 0, 1.0]))[0]
        assert obs.state[-1] == 0.0  # binary state follows the previous gripper command (close)
        with pytest.raises(IndexError):
            env.reset(0, 50)
        # Parallel evaluation ships envs to worker processes: a live env pickles as its settings, no sim.
        clone = pickle.loads(pickle.dumps(env))
        assert clone._env is None and (clone.suite, clone.render_size, clone.flip_images, clone.max_steps) == \
            (env.suite, env.render_size, env.flip_images, env.max_steps)
    finally:
        env.close()


def test_aloha_env():
    pytest.importorskip("gym_aloha")
    from vitavla.rollout.aloha_env import AlohaSimEnv, to_gym_order, to_model_order

    x = np.arange(14)
    assert to_model_order(x).tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 6, 13]
    np.testing.assert_array_equal(to_gym_order(to_model_order(x)), x)

    env = AlohaSimEnv("transfer_cube")
    try:
        assert (env.num_tasks, env.action_dim, env.max_steps, env.max_reward) == (1, 14, 300, 4.0)
        obs = env.reset(0, 0)
        assert obs.static.shape == (480, 640, 3) and obs.static.dtype == np.uint8
        np.testing.assert_array_equal(obs.static, obs.wrist)
        assert obs.state.shape == (14,)
        raw_pos = env._env.unwrapped._env.physics.data.qpos[:16]  # left 8, right 8 (2 fingers each)
        assert np.isclose(obs.state[0], raw_pos[0]) and np.isclose(obs.state[6], raw_pos[8])
        start = time.perf_counter()
        for _ in range(2):  # holding the current pose keeps the arms still: state round-trips via step()
            obs2, done, success, info = env.step(obs.state)
        print(f"\nALOHA: {(time.perf_counter() - start) / 2:.3f} s per step")
        np.testing.assert_allclose(obs2.state[:12], obs.state[:12], atol=0.05)
        assert not done and not success and info["step"] == 2
        a, b = env.reset(0, 1).state, env.reset(0, 1).state
        np.testing.assert_array_equal(a, b)
    finally:
        env.close()


def test_a_libero_env_left_open_exits_without_egl_tracebacks(tmp_path):
    """A script that never closes its LiberoEnv: the env's atexit hook frees robosuite's render contexts
    before EGL's own eglTerminate, so the interpreter exits cleanly (it printed an EGLError traceback from
    every context's __del__ before)."""
    pytest.importorskip("libero.libero")
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "open_env.py"
    script.write_text("from vitavla.rollout.libero_env import LiberoEnv\n"
                      "env = LiberoEnv('libero_object', render_size=32, max_steps=2)\n"
                      "print('frame', env.reset(0, 0).frame.shape)\n")
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, str(script)], cwd=root, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "frame (32, 32, 3)" in run.stdout
    assert "EGLError" not in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]
