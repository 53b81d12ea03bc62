"""The deployable policy: student -> action mapper -> the teacher's action head."""

from __future__ import annotations

from torch import Tensor, nn

from vitavla.action_head import ActionHead, ActionOutput
from vitavla.batch import Window
from vitavla.student import ActionMapper, VLAStudent


class VLAPolicy(nn.Module):
    """Composes the three trained parts; both stages and streaming inference use this one object."""

    def __init__(self, student: VLAStudent, mapper: ActionMapper, action_head: ActionHead):
        super().__init__()
        if mapper.in_dim != student.hidden_size:
            raise ValueError(f"action mapper input {mapper.in_dim} != student LLM width {student.hidden_size}")
        if mapper.out_dim != action_head.hidden_size:
            raise ValueError(f"action mapper output {mapper.out_dim} != action head (teacher) width "
                             f"{action_head.hidden_size}")
        self.student = student
        self.mapper = mapper
        self.action_head = action_head

    @property
    def robot(self):
        return self.student.robot

    def decode(self, student_hidden: Tensor) -> ActionOutput:
        """Student action-token hidden states (..., H) -> arm / gripper outputs."""
        return self.action_head(self.mapper(student_hidden))

    def forward(self, window: Window) -> ActionOutput:
        """Actions for every step and chunk entry of the window, fields (B, T, C, ·)."""
        return self.decode(self.student(window))
