"""ALOHA sim adapter: a :class:`RolloutEnv` over gym-aloha's bimanual joint-space tasks (extra ``sim``).

Tasks: ``transfer_cube`` (``gym_aloha/AlohaTransferCube-v0``) and ``insertion`` (``AlohaInsertion-v0``);
one task per env, so ``num_tasks`` is 1. Layout as :class:`datamodules.aloha.AlohaDataModule` trains with
``arms="both"``: state = action = 12 arm joints then 2 grippers, i.e. gym-aloha's 14-d ``agent_pos`` /
action columns ``[0-5, 7-12, 6, 13]``; :meth:`AlohaSimEnv.step` puts actions back in gym-aloha's order
(left 6 joints + gripper, right 6 joints + gripper). Joints are absolute targets in rad, grippers gym-aloha's
normalized values, both unchanged (the datamodule's normalizer handles the scaling).

Cameras: gym-aloha's pixel observation exposes only ``top`` (480 x 640), so the wrist view is the same
``top`` image; a policy trained with a real wrist camera sees a duplicated top view here. Each step still
costs ~0.25 s because gym-aloha renders three 480 x 640 cameras internally whatever it returns.

Success: the step reward reaches the task's ``max_reward`` (4 for both tasks: cube lifted and transferred /
peg inserted); gym-aloha ends the episode there too.
"""

from __future__ import annotations

import os

import numpy as np

from vitavla.layouts import ALOHA_ARM_COLUMNS
from vitavla.rollout.env import Obs, RolloutEnv

TASKS = {"transfer_cube": ("gym_aloha/AlohaTransferCube-v0", "transfer the cube to the other arm"),
         "insertion": ("gym_aloha/AlohaInsertion-v0", "insert the peg into the socket")}
# gym-aloha column -> model column, the datamodule's own bimanual reorder (one source of truth).
TO_MODEL = np.array(ALOHA_ARM_COLUMNS[14]["both"])
TO_GYM = np.argsort(TO_MODEL)  # inverse permutation: model column -> gym-aloha column


def to_model_order(x: np.ndarray) -> np.ndarray:
    """gym-aloha 14-d (left j0-5, left grip, right j0-5, right grip) -> (12 joints, 2 grippers)."""
    return np.asarray(x)[..., TO_MODEL]


def to_gym_order(x: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_model_order`."""
    return np.asarray(x)[..., TO_GYM]


class AlohaSimEnv(RolloutEnv):
    """gym-aloha bimanual task; episode ``e`` places the objects from a seed derived from (seed, e)."""

    def __init__(self, task: str = "transfer_cube", max_steps: int = 300, static_camera: str = "top",
                 seed: int = 0, gl: str = "egl"):
        if task not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
        if static_camera != "top":
            raise ValueError(f"gym-aloha's pixel observation has only the 'top' camera, got {static_camera!r}")
        if gl not in ("egl", "osmesa"):
            raise ValueError(f"gl must be 'egl' or 'osmesa', got {gl!r}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be positive, got {max_steps}")
        os.environ.setdefault("MUJOCO_GL", gl)  # must precede the first mujoco import (dm_control reads it)
        try:
            import gym_aloha  # noqa: F401  (registers the gym_aloha/* ids)
            import gymnasium as gym
        except ImportError as e:
            raise ImportError("AlohaSimEnv needs gym-aloha: pip install 'vitavla[aloha]'") from e
        self.task, self.static_camera, self.seed = task, static_camera, seed
        self._args = {"task": task, "max_steps": max_steps, "static_camera": static_camera, "seed": seed,
                      "gl": gl}
        self._max_steps = int(max_steps)
        # gymnasium's TimeLimit would truncate at its own 300; the runner owns the step budget instead.
        self._env = gym.make(TASKS[task][0], obs_type="pixels_agent_pos", max_episode_steps=None)
        self.max_reward = float(self._env.unwrapped._env.task.max_reward)
        self._t = 0
        self._started = False

    @property
    def num_tasks(self) -> int:
        return 1

    @property
    def max_steps(self) -> int:
        return self._max_steps

    @property
    def action_dim(self) -> int:
        return 14

    def task_name(self, task_index: int) -> str:
        self._check_task(task_index)
        return self.task

    def reset(self, task_index: int, episode_index: int, seed: int | None = None) -> Obs:
        self._check_task(task_index)
        if episode_index < 0:
            raise IndexError(f"episode_index must be >= 0, got {episode_index}")
        # gym-aloha samples the cube / peg pose from the reset seed; mixing in the episode index gives each
        # episode its own placement, reproducible independently of evaluation order (resume-safe).
        ep_seed = int(np.random.SeedSequence([self.seed if seed is None else seed, episode_index])
                      .generate_state(1)[0])
        raw, _ = self._env.reset(seed=ep_seed)
        self._t, self._started = 0, True
        return self._obs(raw)

    def step(self, action: np.ndarray) -> tuple[Obs, bool, bool, dict]:
        if not self._started:
            raise RuntimeError("AlohaSimEnv.step before reset")
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (14,):
            raise ValueError(f"ALOHA action must have shape (14,) (12 joints, 2 grippers), got {action.shape}")
        raw, reward, terminated, truncated, info = self._env.step(to_gym_order(action))
        self._t += 1
        success = float(reward) >= self.max_reward
        done = success or bool(terminated) or bool(truncated) or self._t >= self._max_steps
        return self._obs(raw), done, success, {**info, "reward": float(reward), "step": self._t}

    def close(self) -> None:
        self._env.close()
        self._started = False

    # Pickling (parallel evaluation ships the env to worker processes): the live gym/MuJoCo env does not
    # pickle, so only the constructor arguments travel and the receiving process builds its own simulator.
    def __getstate__(self) -> dict:
        return dict(self._args)

    def __setstate__(self, args: dict) -> None:
        self.__init__(**args)

    def _check_task(self, task_index: int) -> None:
        if task_index != 0:
            raise IndexError(f"AlohaSimEnv has one task (index 0), got {task_index}")

    def _obs(self, raw: dict) -> Obs:
        top = np.ascontiguousarray(raw["pixels"][self.static_camera])
        state = to_model_order(np.asarray(raw["agent_pos"], dtype=np.float32))
        return Obs(top, top.copy(), state, TASKS[self.task][1])
