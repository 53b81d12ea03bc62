"""The contract every teacher (pretrained action expert) implements.

A teacher reads a :class:`~vitavla.batch.Window` and returns the last-layer hidden states at its action
queries, shape (B, T, Q, D) with Q = ``num_action_queries`` and D = ``hidden_size``. Its pretrained
:class:`ActionHead` turns such hidden states into arm actions in [-1, 1] and gripper logits; the student
reuses that head after mapping its own hidden states into the teacher's space.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from torch import Tensor, nn

from vitavla.action_head import ActionHead, ActionOutput
from vitavla.batch import RobotSpec, Window

__all__ = ["ActionHead", "ActionOutput", "Teacher"]  # the first two re-exported from vitavla.action_head


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
