"""What every action model outputs, and the head that produces it.

:class:`ActionOutput` is the one action format of vitavla: teachers, the student's policy, streaming
inference, rollout executors and the policy server all pass it. :class:`ActionHead` is Seer's pretrained
action decoder; the student reuses a teacher's head after mapping its hidden states into the teacher's space.
Both sit in the core package so that teachers, policies and rollouts import them downward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class ActionOutput:
    """arm: (..., arm_dim) in [-1, 1]; gripper_logit: (..., gripper_dim), sigmoid gives P(gripper target = 1)."""

    arm: Tensor
    gripper_logit: Tensor

    @property
    def gripper_prob(self) -> Tensor:
        return torch.sigmoid(self.gripper_logit)

    def as_action(self) -> Tensor:
        """(..., arm_dim + gripper_dim): the arm values followed by gripper probabilities."""
        return torch.cat([self.arm, self.gripper_prob], dim=-1)


class ActionHead(nn.Module):
    """Seer's action decoder: 2-layer ReLU MLP, then a tanh arm head and a gripper head.

    Module names match Seer's checkpoint keys (``action_decoder.{0,2}``, ``arm_action_decoder.0``,
    ``gripper_action_decoder.0``). Seer applies a sigmoid to the gripper output; this head returns the logit
    so that training can use the numerically stable BCE-with-logits.
    """

    def __init__(self, hidden_size: int, arm_dim: int = 6, gripper_dim: int = 1, decoder_width: int | None = None):
        super().__init__()
        width = decoder_width or hidden_size // 2
        self.hidden_size = hidden_size
        self.action_decoder = nn.Sequential(
            nn.Linear(hidden_size, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()
        )
        self.arm_action_decoder = nn.Sequential(nn.Linear(width, arm_dim), nn.Tanh())
        self.gripper_action_decoder = nn.Sequential(nn.Linear(width, gripper_dim))

    def forward(self, hidden: Tensor) -> ActionOutput:
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"ActionHead expects hidden size {self.hidden_size}, got {hidden.shape[-1]}")
        h = self.action_decoder(hidden)
        return ActionOutput(arm=self.arm_action_decoder(h), gripper_logit=self.gripper_action_decoder(h))
