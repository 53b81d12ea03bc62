"""A policy sees at evaluation exactly what it was trained on: the rollout path (``LiberoEnv`` ->
``to_observation``) and the training path (demo HDF5 -> ``LiberoDataModule`` windows) give equal images
(uint8, bit for bit), state and instruction for the same simulator state."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

import datamodules.base
import vitavla.images
import vitavla.rollout.episode
from datamodules.base import WindowDataset
from datamodules.libero import LiberoDataModule, LiberoReader
from datamodules.normalization import Normalizer
from tests.conftest import make_demo, write_libero
from vitavla.images import resize_uint8
from vitavla.rollout.env import Obs
from vitavla.rollout.runner import to_observation

INSTRUCTION = "pick up the alphabet soup and place it in the basket"  # libero_object task 0


def _windows(root, image_size: int, flip: bool, tmp_path) -> WindowDataset:
    dm = LiberoDataModule(str(root), num_steps=1, image_size=image_size, batch_size=1, num_workers=0,
                          stats_cache_dir=str(tmp_path / "stats"), val_fraction=0.0, flip_images=flip)
    dm.setup("fit")
    return dm._train  # one demo, a window starting at every frame: window k is frame k


@pytest.mark.parametrize("size", [24, 40, 64])  # down, same, up
def test_training_and_rollout_resize_give_identical_bytes(tmp_path, size):
    # One function on both paths (not two that happen to agree today).
    assert datamodules.base.resize_uint8 is vitavla.images.resize_uint8 is vitavla.rollout.episode.resize_uint8
    rng = np.random.default_rng(size)
    demo = make_demo(5, 40, rng)
    path = tmp_path / "pick_up_the_cup_demo.hdf5"
    write_libero(path, {"demo_0": demo})
    reader = LiberoReader(path)
    norm = Normalizer.fit(reader.all_actions(), reader.robot.arm_dim)
    ds = WindowDataset(reader, [0], num_steps=3, image_size=size, normalizer=norm)
    w = ds[1]
    for t in range(3):
        f = 1 + t
        obs = Obs(demo["agentview_rgb"][f], demo["eye_in_hand_rgb"][f],
                  np.concatenate([demo["ee_states"][f], demo["gripper_states"][f]]), "pick up the cup")
        o = to_observation(obs, size)
        assert o.images.shape == (1, 2, 3, size, size) and o.images.dtype == torch.uint8
        assert torch.equal(w["images"][t], o.images[0])
        assert torch.equal(w["state"][t], o.state[0])
    if size == 40:  # at the stored size nothing is interpolated
        assert torch.equal(w["images"][0, 0], torch.from_numpy(demo["agentview_rgb"][1]).permute(2, 0, 1))
    else:
        ref = resize_uint8(demo["agentview_rgb"][1:4], size)
        assert torch.equal(w["images"][:, 0], ref)


@pytest.mark.sim
def test_libero_rollout_inputs_equal_training_windows(libero_demo, tmp_path):
    """Replays a scripted demo's actions in a LiberoEnv set up as the recorder's (same init state, seed,
    settle steps, render size, fast rendering; MuJoCo is deterministic) and compares each step's policy
    input with the demo's training window of that step. The replay records a video meanwhile: rendering the
    video camera must not change what the policy sees."""
    from vitavla.rollout.libero_env import LiberoEnv

    cfg, res = libero_demo
    with h5py.File(res.path) as h:
        g = h["data/demo_0"]
        actions = g["executed_actions"][()]  # the commands the simulator got (labels + DART noise)
        init_state, attempt = int(g.attrs["init_state_index"]), int(g.attrs["attempt"])
    size, steps = 48, 6  # the demo is 32 px: both paths upscale
    native, flipped = _windows(cfg.out, size, False, tmp_path), _windows(cfg.out, size, True, tmp_path)
    env = LiberoEnv(cfg.suite, protocol="seer", render_size=cfg.image_size, max_steps=cfg.max_steps,
                    settle_steps=cfg.settle_steps, settle_action=cfg.settle_action, flip_images=False,
                    gripper_state="width", seed=cfg.seed,
                    fast_render=cfg.fast_render, mesh_lod=cfg.mesh_lod, video_size=128)
    try:
        env.set_recording(True)
        obs = env.reset(cfg.tasks[0], init_state, seed=cfg.seed + attempt)
        for k in range(steps):
            o = to_observation(obs, size)
            w = native[k]
            assert torch.equal(w["images"][0], o.images[0]), f"step {k}: images differ"
            assert torch.equal(w["state"][0], o.state[0]), f"step {k}: state differs"
            assert w["instruction"] == o.instruction[0] == INSTRUCTION
            # flip_images on both sides (OpenVLA's upright frames): LiberoEnv rotates renders by 180 degrees.
            up = Obs(obs.static[::-1, ::-1].copy(), obs.wrist[::-1, ::-1].copy(), obs.state, obs.instruction)
            assert torch.equal(flipped[k]["images"][0], to_observation(up, size).images[0])
            # The video camera: 128 px, upright, the policy's scene (its 32 px downscale is close to the
            # upright policy frame, and much closer than to the frame the other way up).
            assert obs.video.shape == (128, 128, 3)
            small = resize_uint8(obs.video, cfg.image_size).permute(1, 2, 0).numpy().astype(int)
            upright = np.abs(small - up.static.astype(int)).mean()
            assert upright < 25 and upright < 0.5 * np.abs(small - obs.static.astype(int)).mean()
            obs = env.step(actions[k])[0]
        env.set_recording(False)  # not recorded: no render, the video frame is the policy's, turned upright
        obs = env.step(actions[steps])[0]
        np.testing.assert_array_equal(obs.video, obs.static[::-1, ::-1])
        assert torch.equal(native[steps + 1]["images"][0], to_observation(obs, size).images[0])
    finally:
        env.close()


@pytest.mark.sim
def test_libero_demo_replays_open_loop_to_success(libero_demo):
    """The recorded actions, replayed open loop from the demo's init state through the rollout adapter, solve
    the task at the step the recorder stopped: the action and gripper conventions (7-D OSC deltas, -1 open /
    +1 close) and the control rate (one env.step per recorded action) are the same on both sides."""
    from vitavla.rollout.libero_env import LiberoEnv

    cfg, res = libero_demo
    with h5py.File(res.path) as h:
        g = h["data/demo_0"]
        actions = g["executed_actions"][()]  # the commands the simulator got (labels + DART noise)
        init_state, attempt = int(g.attrs["init_state_index"]), int(g.attrs["attempt"])
    env = LiberoEnv(cfg.suite, protocol="seer", render_size=cfg.image_size, max_steps=len(actions) + 5,
                    settle_steps=cfg.settle_steps, settle_action=cfg.settle_action, flip_images=False,
                    gripper_state="width", seed=cfg.seed,
                    fast_render=cfg.fast_render, mesh_lod=cfg.mesh_lod)
    try:
        env.reset(cfg.tasks[0], init_state, seed=cfg.seed + attempt)
        outcomes = [env.step(a)[2] for a in actions]
    finally:
        env.close()
    # The recorder keeps a demo only once the BDDL goal holds and stops right there: the replay succeeds on
    # the last action and not before.
    assert outcomes[-1] and not any(outcomes[:-1])
    # The gripper closed and opened again: a grasp, not a push.
    closes = np.flatnonzero(actions[:, 6] > 0)
    assert len(closes) and actions[0, 6] == -1 and actions[-1, 6] == -1
