"""The contract a simulator adapter (LIBERO, CALVIN, ALOHA sim) implements, and a scripted stand-in for tests.

An adapter hides everything benchmark-specific (init states, camera flips, state layout, gripper sign)
behind :class:`RolloutEnv` and returns :class:`Obs` in the layout the policy was trained on. The runner
never imports a simulator, so it is testable without one.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Obs:
    """One observation of one env: two uint8 H x W x 3 cameras, the proprio state, the instruction.

    ``video`` (optional, never shown to the policy): the frame a person watches in rollout videos and the
    first/last-frame sheet, upright and possibly larger than the policy's cameras. ``None`` (the default, and
    what envs without it return): reports use ``static``.
    """

    static: np.ndarray
    wrist: np.ndarray
    state: np.ndarray
    instruction: str
    video: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("static", "wrist", "video"):
            img = getattr(self, name)
            if img is None and name == "video":
                continue
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"Obs.{name} must be uint8 (H, W, 3), got {img.dtype} {img.shape}")
        self.state = np.asarray(self.state, dtype=np.float32)

    @property
    def frame(self) -> np.ndarray:
        """The frame for people: ``video`` when the env renders one, else the policy's ``static`` view."""
        return self.static if self.video is None else self.video


class RolloutEnv(ABC):
    """One simulated environment evaluated task by task, episode by episode."""

    @property
    @abstractmethod
    def num_tasks(self) -> int:
        """Tasks of the suite (e.g. 10 for a LIBERO suite)."""

    @property
    @abstractmethod
    def max_steps(self) -> int:
        """Policy steps per episode before it counts as a failure (after any settle steps)."""

    @property
    @abstractmethod
    def action_dim(self) -> int:
        """Length of the raw action :meth:`step` takes."""

    @abstractmethod
    def task_name(self, task_index: int) -> str:
        """Human-readable name of a task (used in result files and per-task reports)."""

    @abstractmethod
    def reset(self, task_index: int, episode_index: int, seed: int | None = None) -> Obs:
        """Start episode ``episode_index`` of task ``task_index`` (LIBERO: init state ``episode_index``)."""

    @abstractmethod
    def step(self, action: np.ndarray) -> tuple[Obs, bool, bool, dict]:
        """Apply one raw action; returns (obs, done, success, info)."""

    def close(self) -> None:
        """Free simulator resources; the default has none."""

    def set_recording(self, on: bool) -> None:
        """Whether the next episode (from the next :meth:`reset` on) is recorded as a video. The runner calls
        it before every reset. An env that can render a better frame for people (:attr:`Obs.video`: larger,
        another camera) does that expensive work only while recording; the default renders nothing extra."""


TASKS = (("top left", (-0.6, 0.6)), ("top right", (0.6, 0.6)), ("bottom left", (-0.6, -0.6)),
         ("bottom right", (0.6, -0.6)), ("center", (0.0, 0.0)))


@dataclass
class ScriptedStandInEnv(RolloutEnv):
    """Deterministic 2-D point reaching in [-1, 1]^2, rendered as images; a stand-in for a simulator.

    Task i asks to reach a fixed goal (``TASKS[i % 5]``); the start point depends on (task, episode, seed).
    Raw action: ``action[0:2]`` is a velocity in [-1, 1] scaled by ``speed``; the rest is ignored.
    State (``state_dim`` >= 5): x, y, goal x, goal y, zeros, and a last value 1.0 (an "open" binary gripper)
    so it matches a ``RobotSpec`` with a binary gripper. Success: distance to the goal < ``tolerance``.
    ``crash_at``: raise ``RuntimeError`` at that step (for episodes in ``crash_episodes``, or all if None),
    to exercise the runner's error handling. ``sim_cost_ms``: CPU time each reset and step burns in a busy
    loop (not a sleep), to model a CPU-bound simulator in throughput benchmarks of parallel evaluation.
    ``video_size``: while recording (:meth:`set_recording`), :attr:`Obs.video` is the static scene drawn again
    at that size, like a simulator rendering a larger camera for videos; otherwise no video frame.
    """

    num_task: int = 2
    steps: int = 8
    image_size: int = 32
    state_dim: int = 7
    act_dim: int = 7
    speed: float = 0.25
    tolerance: float = 0.1
    crash_at: int | None = None
    crash_episodes: set[tuple[int, int]] | None = None
    seed: int = 0
    sim_cost_ms: float = 0.0
    video_size: int | None = None
    resets: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.state_dim < 5:
            raise ValueError("ScriptedStandInEnv needs state_dim >= 5 (position, goal, gripper)")
        if self.sim_cost_ms < 0:
            raise ValueError(f"ScriptedStandInEnv.sim_cost_ms must be >= 0, got {self.sim_cost_ms}")
        self._pos = self._goal = np.zeros(2)
        self._t = 0
        self._task = self._episode = -1
        self._recording = False

    def set_recording(self, on: bool) -> None:
        self._recording = bool(on)

    @property
    def num_tasks(self) -> int:
        return self.num_task

    @property
    def max_steps(self) -> int:
        return self.steps

    @property
    def action_dim(self) -> int:
        return self.act_dim

    def task_name(self, task_index: int) -> str:
        return f"reach_{TASKS[task_index % len(TASKS)][0].replace(' ', '_')}"

    def instruction(self, task_index: int) -> str:
        return f"move to the {TASKS[task_index % len(TASKS)][0]} target"

    def reset(self, task_index: int, episode_index: int, seed: int | None = None) -> Obs:
        if not 0 <= task_index < self.num_tasks:
            raise IndexError(f"task {task_index} outside [0, {self.num_tasks})")
        rng = np.random.default_rng([self.seed if seed is None else seed, task_index, episode_index])
        self._task, self._episode, self._t = task_index, episode_index, 0
        self._goal = np.array(TASKS[task_index % len(TASKS)][1])
        self._pos = rng.uniform(-0.9, 0.9, size=2)
        self.resets += 1
        self._burn()
        return self._obs()

    def step(self, action: np.ndarray) -> tuple[Obs, bool, bool, dict]:
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (self.act_dim,):
            raise ValueError(f"action must have shape ({self.act_dim},), got {action.shape}")
        if self.crash_at is not None and self._t == self.crash_at and (
                self.crash_episodes is None or (self._task, self._episode) in self.crash_episodes):
            raise RuntimeError(f"scripted simulator crash at step {self._t}")
        self._pos = np.clip(self._pos + self.speed * np.clip(action[:2], -1, 1), -1, 1)
        self._t += 1
        self._burn()
        dist = float(np.linalg.norm(self._pos - self._goal))
        success = dist < self.tolerance
        return self._obs(), success or self._t >= self.steps, success, {"distance": dist, "step": self._t}

    def _burn(self) -> None:
        # Busy-wait on the clock: occupies a core like physics + rendering would (a sleep would not).
        end = time.perf_counter() + self.sim_cost_ms / 1000.0
        while time.perf_counter() < end:
            pass

    @staticmethod
    def _pixel(p: np.ndarray, s: int) -> tuple[int, int]:
        col = int(round((p[0] + 1) / 2 * (s - 1)))
        row = int(round((1 - p[1]) / 2 * (s - 1)))
        return row, col

    def _draw(self, s: int) -> np.ndarray:
        """The scene from above at ``s`` px: goal green, point red."""
        r = max(1, s // 16)
        img = np.full((s, s, 3), 40, dtype=np.uint8)
        for p, color in ((self._goal, (0, 220, 0)), (self._pos, (220, 0, 0))):
            row, col = self._pixel(p, s)
            img[max(0, row - r): row + r + 1, max(0, col - r): col + r + 1] = color
        return img

    def _obs(self) -> Obs:
        s = self.image_size
        static = self._draw(s)
        # The "wrist camera" sees how far the goal is: brightness falls with distance.
        dist = float(np.linalg.norm(self._pos - self._goal))
        wrist = np.full((s, s, 3), int(255 * max(0.0, 1 - dist / 2.9)), dtype=np.uint8)
        state = np.zeros(self.state_dim, dtype=np.float32)
        state[:4] = [*self._pos, *self._goal]
        state[-1] = 1.0
        video = self._draw(self.video_size) if self._recording and self.video_size else None
        return Obs(static, wrist, state, self.instruction(self._task), video=video)


def close_quietly(env) -> None:
    """Close an env whose simulator may be the thing that crashed (None and an env without ``close`` are
    fine): a failing close must not hide the recorded crash or stop the evaluation, so it is logged."""
    close = getattr(env, "close", None)
    if close is None:
        return
    try:
        close()
    except Exception as e:  # the simulator is being discarded anyway
        logging.getLogger(__name__).warning("closing %s failed: %s: %s", type(env).__name__, type(e).__name__, e)
