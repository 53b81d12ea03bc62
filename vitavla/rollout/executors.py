"""Action executors: which action of the predicted chunks is sent to the environment at step t.

The policy predicts, at every step it is queried, a chunk of C future actions (arm in [-1, 1], gripper
probability in [0, 1]). Benchmarks disagree on how that chunk is used (Seer, OpenVLA-OFT and openpi each
do it differently), so the choice is an object of its own:

* :class:`FirstActionExecutor` - query every step, execute the first action (Seer's CALVIN evaluation,
  https://github.com/OpenRobotLab/Seer).
* :class:`ChunkExecutor` - execute the chunk open-loop and query only every ``steps`` steps
  (OpenVLA-OFT executes all 8, openpi the first 5 of 10).
* :class:`TemporalEnsembleExecutor` - query every step and average every prediction made for step t with
  weights exp(-k i), i = 0 the oldest (Seer's LIBERO evaluation; the temporal ensembling of ACT, Zhao et al.
  2023).

All executors work on B environments stepped in lockstep (the batch of one :class:`StreamingPolicy`) and
never mix values across the batch. Their output is still normalized; :func:`to_env_action` maps it to raw
env units with the dataset's :class:`~vitavla.normalizer.Normalizer`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from vitavla.action_head import ActionOutput
from vitavla.normalizer import Normalizer

GripperMode = Literal["binary", "continuous"]


class ActionExecutor(ABC):
    """Turns the chunks predicted so far into the (B, arm_dim + gripper_dim) normalized action of step t.

    Per episode: :meth:`reset`, then for every step t = 0, 1, ...: if :meth:`needs_query` is true, query the
    policy and pass its output to :meth:`update`; then call :meth:`act`.
    """

    def __init__(self, gripper_mode: GripperMode = "binary", threshold: float = 0.5):
        if gripper_mode not in ("binary", "continuous"):
            raise ValueError(f"gripper_mode must be 'binary' or 'continuous', got {gripper_mode!r}")
        self.gripper_mode = gripper_mode
        self.threshold = threshold
        self.reset()

    @abstractmethod
    def reset(self) -> None:
        """Forget everything: call at the start of every episode (and CALVIN subtask)."""

    @abstractmethod
    def needs_query(self, t: int) -> bool:
        """Whether the policy must be queried before :meth:`act` at step ``t``."""

    @abstractmethod
    def update(self, t: int, out: ActionOutput) -> None:
        """Record the chunk predicted at step ``t``: fields (B, C, ·)."""

    @abstractmethod
    def _select(self, t: int) -> tuple[Tensor, Tensor]:
        """Arm (B, arm_dim) and gripper probability (B, g) for step ``t``, before gripper processing."""

    def act(self, t: int) -> Tensor:
        """Normalized action (B, arm_dim + g): arm in [-1, 1], gripper 0/1 (binary) or a probability."""
        arm, prob = self._select(t)
        if self.gripper_mode == "binary":
            # Seer's evaluation thresholds sigmoid > 0.5 (strictly), after any averaging (CALVIN and LIBERO).
            prob = (prob > self.threshold).to(prob.dtype)
        return torch.cat([arm, prob], dim=-1)

    @staticmethod
    def _split(out: ActionOutput) -> tuple[Tensor, Tensor]:
        arm, logit = out.arm, out.gripper_logit
        if arm.dim() != 3 or logit.dim() != 3 or arm.shape[:2] != logit.shape[:2]:
            raise ValueError(f"executor expects chunk fields (B, C, ·), got arm {tuple(out.arm.shape)} and "
                             f"gripper {tuple(out.gripper_logit.shape)}")
        return out.arm.detach().float(), out.gripper_prob.detach().float()


class FirstActionExecutor(ActionExecutor):
    """One query per step, execute its first action (CALVIN default: Seer executes ``arm[:, 0]``)."""

    def reset(self) -> None:
        self._last: tuple[Tensor, Tensor] | None = None
        self._t: int | None = None

    def needs_query(self, t: int) -> bool:
        return True

    def update(self, t: int, out: ActionOutput) -> None:
        self._last, self._t = self._split(out), t

    def _select(self, t: int) -> tuple[Tensor, Tensor]:
        if self._last is None or self._t != t:
            raise RuntimeError(f"FirstActionExecutor: no prediction for step {t}; query the policy every "
                               "step")
        arm, prob = self._last
        return arm[:, 0], prob[:, 0]


class ChunkExecutor(ActionExecutor):
    """Open-loop chunks: query at step t, execute entries 0..steps-1 of it, query again at t + steps."""

    def __init__(self, steps: int | None = None, gripper_mode: GripperMode = "binary",
                 threshold: float = 0.5):
        if steps is not None and steps < 1:
            raise ValueError(f"ChunkExecutor.steps must be >= 1, got {steps}")
        self.steps = steps
        super().__init__(gripper_mode, threshold)

    def reset(self) -> None:
        self._chunk: tuple[Tensor, Tensor] | None = None
        self._start = 0
        self._len = 0

    def needs_query(self, t: int) -> bool:
        return self._chunk is None or not self._start <= t < self._start + self._len

    def update(self, t: int, out: ActionOutput) -> None:
        arm, prob = self._split(out)
        c = arm.shape[1]
        if self.steps is not None and self.steps > c:
            raise ValueError(f"ChunkExecutor.steps={self.steps} exceeds the predicted chunk length {c}")
        self._chunk, self._start, self._len = (arm, prob), t, self.steps or c

    def _select(self, t: int) -> tuple[Tensor, Tensor]:
        if self.needs_query(t):
            raise RuntimeError(f"ChunkExecutor: step {t} is outside the current chunk; query the policy "
                               "first")
        arm, prob = self._chunk
        return arm[:, t - self._start], prob[:, t - self._start]


class TemporalEnsembleExecutor(ActionExecutor):
    """Seer's temporal ensembling: weighted mean of all predictions made for the current step.

    A chunk predicted at step s holds predictions for steps s..s+C-1, so step t collects up to C of them.
    Weights are exp(-k * i) over those predictions ordered oldest first (i = 0 the oldest), normalized to
    sum 1, as in Seer's ``eval_utils_libero.py``; with k = 0.01 this is close to a plain mean. Seer detects
    "filled" buffer cells by testing all 7 values for nonzero, which would silently drop a genuine all-zero
    prediction; here the bookkeeping is explicit.
    """

    def __init__(self, k: float = 0.01, gripper_mode: GripperMode = "binary", threshold: float = 0.5):
        if not math.isfinite(k):
            raise ValueError(f"TemporalEnsembleExecutor.k must be finite, got {k}")
        self.k = k
        super().__init__(gripper_mode, threshold)

    def reset(self) -> None:
        # future step -> predictions for it in arrival order (oldest first), each (arm (B, a), prob (B, g)).
        self._buffer: dict[int, list[tuple[Tensor, Tensor]]] = {}

    def needs_query(self, t: int) -> bool:
        return True

    def update(self, t: int, out: ActionOutput) -> None:
        arm, prob = self._split(out)
        for j in range(arm.shape[1]):
            self._buffer.setdefault(t + j, []).append((arm[:, j], prob[:, j]))

    def weights(self, n: int) -> Tensor:
        """Normalized weights of ``n`` predictions, index 0 = oldest."""
        w = torch.exp(-self.k * torch.arange(n, dtype=torch.float64))
        return (w / w.sum()).float()

    def _select(self, t: int) -> tuple[Tensor, Tensor]:
        preds = self._buffer.get(t)
        if not preds:
            raise RuntimeError(f"TemporalEnsembleExecutor: no prediction for step {t}; query the policy "
                               "every step")
        # Steps before t can never be executed again: drop them so the buffer stays at most C entries long.
        for old in [s for s in self._buffer if s < t]:
            del self._buffer[old]
        w = self.weights(len(preds))
        arm = sum(wi * a for wi, (a, _) in zip(w, preds))
        prob = sum(wi * p for wi, (_, p) in zip(w, preds))
        return arm, prob


def to_env_action(action: Tensor, normalizer: Normalizer | None = None) -> np.ndarray:
    """Normalized (B, arm + g) -> raw env units as float32 numpy (identity without a normalizer).

    A binary gripper 0/1 becomes ``gripper_low``/``gripper_high`` (e.g. -1/+1 for a LIBERO normalizer fitted
    with ``gripper_range=(-1, 1)``), which is exactly Seer's ``(x - 0.5) * 2`` map.
    """
    if normalizer is not None:
        if action.shape[-1] != normalizer.arm_dim + normalizer.gripper_dim:
            raise ValueError(f"action has {action.shape[-1]} values, normalizer expects "
                             f"{normalizer.arm_dim} + {normalizer.gripper_dim}")
        action = normalizer.unnormalize_actions(action)
    return action.detach().cpu().numpy().astype(np.float32)


def build_executor(name: str, ensemble_k: float = 0.01, chunk_steps: int | None = None) -> ActionExecutor:
    """A fresh executor by config name: ``first``, ``chunk`` (``chunk_steps`` open-loop) or ``ensemble``."""
    if name == "first":
        return FirstActionExecutor()
    if name == "chunk":
        return ChunkExecutor(chunk_steps)
    if name == "ensemble":
        return TemporalEnsembleExecutor(ensemble_k)
    raise ValueError(f"executor must be 'first', 'chunk' or 'ensemble', got {name!r}")
