"""The contract every teacher (pretrained action expert) implements.

A teacher reads a :class:`~vitavla.batch.Window` and returns the last-layer hidden states at its action
queries, shape (B, T, Q, D) with Q = ``num_action_queries`` and D = ``hidden_size``. Its pretrained
:class:`ActionHead` turns such hidden states into arm actions in [-1, 1] and gripper logits; the student
reuses that head after mapping its own hidden states into the teacher's space.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from vitavla.batch import RobotSpec, Window


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


class Teacher(nn.Module, ABC):
    """A pretrained action model whose hidden states the student learns to match.

    Subclasses set ``hidden_size``, ``num_action_queries``, ``robot`` and ``action_head`` in their
    constructor, and implement :meth:`encode`. :meth:`freeze` puts the teacher in eval mode for good.
    """

    hidden_size: int
    num_action_queries: int
    robot: RobotSpec
    action_head: ActionHead
    max_steps: int | None = None
    """The longest window the teacher accepts (e.g. Seer's position-embedding length), or None."""
    image_size: int = 224
    """Side of the square images the teacher reads from a Window."""

    _frozen: bool = False

    @abstractmethod
    def encode(self, window: Window) -> Tensor:
        """Last-layer hidden states at the action queries, (B, T, num_action_queries, hidden_size)."""

    def predict(self, window: Window) -> ActionOutput:
        """The teacher's own actions for every step and query of the window."""
        return self.action_head(self.encode(window))

    def training_loss(self, window: Window) -> tuple[Tensor, dict[str, Tensor]]:
        """The teacher's own training objective: MAE(arm) + 0.01 * BCE(gripper) unless a subclass knows better."""
        from vitavla.losses import action_loss

        if window.actions is None:
            raise ValueError(f"{type(self).__name__}.training_loss needs Window.actions")
        out = self.predict(window)
        return action_loss(out, window.actions, window.action_valid, self.robot)

    def export(self, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
        """Write the weights as a file this teacher's ``checkpoint`` argument loads (``TeacherModule`` calls it
        at the end of training).

        Default: the whole state dict as ``.safetensors`` with ``metadata`` in the header, which
        :class:`~teachers.TransformerTeacher` reads. A teacher whose loader expects another layout (Seer's
        official one) overrides this.
        """
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"{type(self).__name__}.export writes .safetensors, got {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"format": "pt", "class": type(self).__name__, **(metadata or {})})
        return path

    def freeze(self) -> Teacher:
        """Frozen teacher: no gradients, eval mode (dropout off), and it stays in eval under ``.train()``."""
        self.requires_grad_(False)
        self._frozen = True
        return super().train(False)

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False if self._frozen else mode)

    def check_window(self, window: Window) -> Window:
        return window.validate(self.robot, image_size=self.image_size, max_steps=self.max_steps)
