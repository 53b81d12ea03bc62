"""The robot side of ``vitavla serve``: a control loop over openpi-client, chunked or temporally ensembled.

Only numpy and ``openpi-client`` are needed here (no torch), so this runs on the robot's computer::

    from openpi_client.websocket_client_policy import WebsocketClientPolicy
    from vitavla.serving.client import EnsembleController, ChunkController

    policy = WebsocketClientPolicy("127.0.0.1", 8000, api_key=None)
    ctl = EnsembleController(policy)            # query every step, average overlapping chunks (Seer, LIBERO)
    # ctl = ChunkController(policy, steps=3)    # query every 3 steps, execute the chunk open-loop
    ctl.reset()
    for t in range(max_steps):
        action = ctl.act(robot_observation_dict)  # robot units, gripper already binary
        robot.apply(action)

The executors mirror :mod:`vitavla.rollout.executors` (what ``vitavla test`` runs) on the server's replies:
the server returns the chunk in robot units with a binary gripper plus ``gripper_prob``. Un-normalizing is
affine per dimension, so averaging robot-unit arm values equals averaging normalized values and then
un-normalizing; the gripper is averaged as a probability and thresholded (> 0.5) after averaging, as Seer
does, then mapped to the metadata's ``gripper_low``/``gripper_high``. ``examples/robot_loop.py`` drives a
PiPer (6+1) or ALOHA (12+2) loop with it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Protocol

import numpy as np


class InferPolicy(Protocol):
    """openpi's ``BasePolicy``: ``WebsocketClientPolicy`` or anything with ``infer`` and metadata."""

    def infer(self, obs: dict) -> dict: ...

    def get_server_metadata(self) -> dict: ...


class _Controller(ABC):
    def __init__(self, policy: InferPolicy):
        self.policy = policy
        self.meta = policy.get_server_metadata()
        self.reset_key = self.meta["obs_keys"]["reset"]
        self.arm_dim = int(self.meta["robot"]["arm_dim"])
        self.queries = 0
        self.reset()

    def reset(self) -> None:
        """Start a new episode: the next query carries ``reset: True`` (the server drops its history)."""
        self.t = 0
        self._new_episode = True

    def _query(self, obs: dict) -> dict:
        reply = self.policy.infer({**obs, self.reset_key: self._new_episode})
        self._new_episode = False
        self.queries += 1
        return reply

    def _gripper(self, prob: np.ndarray) -> np.ndarray:
        low, high = self.meta.get("gripper_low"), self.meta.get("gripper_high")
        binary = (prob > 0.5).astype(np.float32)
        if low is None:  # a policy exported without a normalizer answers in normalized units
            return binary
        low, high = np.asarray(low, np.float32), np.asarray(high, np.float32)
        return binary * (high - low) + low

    @abstractmethod
    def act(self, obs: dict) -> np.ndarray:
        """The action to execute now, in robot units, for this step's observation."""


class ChunkController(_Controller):
    """Query at step t, execute entries 0..steps-1 of the chunk open-loop, query again at t + steps (like
    openpi's ``ActionChunkBroker``; ``steps`` defaults to the whole chunk)."""

    def __init__(self, policy: InferPolicy, steps: int | None = None):
        super().__init__(policy)
        chunk = int(self.meta["action_chunk"])
        self.steps = steps or chunk
        if not 1 <= self.steps <= chunk:
            raise ValueError(f"ChunkController.steps must be in [1, {chunk}] (the server's chunk), got "
                             f"{steps}")

    def reset(self) -> None:
        super().reset()
        self._chunk: np.ndarray | None = None
        self._start = 0

    def act(self, obs: dict) -> np.ndarray:
        if self._chunk is None or self.t - self._start >= self.steps:
            self._chunk, self._start = self._query(obs)["actions"], self.t
        action = self._chunk[self.t - self._start]
        self.t += 1
        return action


class EnsembleController(_Controller):
    """Query every step; the action of step t is the mean of every prediction made for t, weighted
    exp(-k i) with i = 0 the oldest (Seer's temporal ensembling, ``TemporalEnsembleExecutor``)."""

    def __init__(self, policy: InferPolicy, k: float = 0.01):
        if not math.isfinite(k):
            raise ValueError(f"EnsembleController.k must be finite, got {k}")
        self.k = k
        super().__init__(policy)

    def reset(self) -> None:
        super().reset()
        self._buffer: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}

    def act(self, obs: dict) -> np.ndarray:
        reply = self._query(obs)
        arm, prob = reply["actions"][:, : self.arm_dim], reply["gripper_prob"]
        for j in range(arm.shape[0]):
            self._buffer.setdefault(self.t + j, []).append((arm[j], prob[j]))
        for old in [s for s in self._buffer if s < self.t]:
            del self._buffer[old]
        preds = self._buffer[self.t]
        w = np.exp(-self.k * np.arange(len(preds), dtype=np.float64))
        w = (w / w.sum()).astype(np.float32)
        mean_arm = sum(wi * a for wi, (a, _) in zip(w, preds))
        mean_prob = sum(wi * p for wi, (_, p) in zip(w, preds))
        self.t += 1
        return np.concatenate([mean_arm, self._gripper(mean_prob)]).astype(np.float32)
