"""A teacher as a closed-loop policy, so a distilled student can be compared with its teacher in the same sim.

Seer's own inference wrapper (its evaluation code, https://github.com/OpenRobotLab/Seer) keeps the last S
frames and re-runs the whole model on them every control step; the action read out is the newest step's. :class:`WindowedTeacherPolicy` does the same
for any :class:`~teachers.base.Teacher` through its :meth:`~teachers.base.Teacher.predict`. Seer right-pads
a short history by repeating the newest frame; with its per-step causal mask that padding never reaches the
newest step's outputs, so running on the frames seen so far (T < S) gives the same actions more cheaply.

It is a :class:`~vitavla.policy_protocol.RolloutPolicy`: ``reset()``, ``step(obs) -> ActionOutput`` with
fields (B, action_chunk, ·), ``select(rows)`` to drop finished episodes from the batch, and the
``image_size`` and ``robot`` of its teacher.
"""

from __future__ import annotations

import torch
from torch import Tensor

from teachers.base import Teacher
from vitavla.action_head import ActionOutput
from vitavla.batch import BatchError, Window
from vitavla.observation import Observation


class WindowedTeacherPolicy:
    """Keeps the last ``history`` observations of B episodes and queries ``teacher`` on them every step."""

    def __init__(self, teacher: Teacher, history: int | None = None):
        self.teacher = teacher
        self.history = int(history or teacher.max_steps or 10)
        if teacher.max_steps is not None and self.history > teacher.max_steps:
            raise ValueError(f"history={self.history} exceeds the teacher's max_steps={teacher.max_steps}")
        if self.history < 1:
            raise ValueError(f"history must be >= 1, got {self.history}")
        self.robot = teacher.robot
        self.image_size = teacher.image_size
        self.reset()

    def reset(self) -> None:
        """Forget the episodes: call at the start of every episode."""
        self._images: list[Tensor] = []
        self._states: list[Tensor] = []
        self._instruction: list[str] | None = None

    @property
    def held_steps(self) -> int:
        return len(self._images)

    @torch.no_grad()
    def step(self, obs: Observation) -> ActionOutput:
        """Actions of the newest step: fields (B, action_chunk, ·)."""
        if obs.images.dim() != 5 or obs.state.dim() != 2:
            raise BatchError(f"Observation.images must be (B, V, 3, H, W) and state (B, state_dim), got "
                             f"{tuple(obs.images.shape)} and {tuple(obs.state.shape)}")
        if self._images and obs.images.shape[0] != self._images[-1].shape[0]:
            raise BatchError(f"batch of {obs.images.shape[0]} observations after {self._images[-1].shape[0]}; "
                             "use select(rows) to drop finished episodes")
        if self._instruction is None:
            self._instruction = list(obs.instruction)
        elif list(obs.instruction) != self._instruction:
            raise BatchError("the instruction changed mid-episode; call reset() before a new instruction")
        self._images = (self._images + [obs.images])[-self.history:]
        self._states = (self._states + [obs.state.float()])[-self.history:]
        images = torch.stack(self._images, dim=1)
        b, t = images.shape[:2]
        window = Window(images=images, instruction=self._instruction, state=torch.stack(self._states, dim=1),
                        valid=torch.ones(b, t, dtype=torch.bool))
        out = self.teacher.predict(window)
        return ActionOutput(arm=out.arm[:, -1], gripper_logit=out.gripper_logit[:, -1])

    def select(self, rows: list[int]) -> None:
        """Keep only batch rows ``rows`` (in that order), e.g. the episodes still running."""
        if self._instruction is None:
            return
        b = len(self._instruction)
        if any(not 0 <= r < b for r in rows):
            raise IndexError(f"rows {rows} outside a batch of {b}")
        index = torch.as_tensor(rows, dtype=torch.long)
        self._images = [x.index_select(0, index.to(x.device)) for x in self._images]
        self._states = [x.index_select(0, index.to(x.device)) for x in self._states]
        self._instruction = [self._instruction[r] for r in rows]
