"""Small builders shared by the student / streaming / module tests."""

from __future__ import annotations

import torch

from teachers.base import ActionHead
from vitavla.batch import RobotSpec, fake_window
from vitavla.policy import VLAPolicy
from vitavla.student import ActionMapper, VLAStudent

IMAGE_SIZE = 224


def tiny_backbone(family: str, tokens_per_image: int = 4):
    if family == "internvl":
        from vitavla.backbones.internvl import InternVLBackbone

        return InternVLBackbone(path="tiny", tokens_per_image=tokens_per_image, image_size=IMAGE_SIZE)
    from vitavla.backbones.llava import LlavaBackbone

    return LlavaBackbone(path="tiny", tokens_per_image=tokens_per_image, image_size=IMAGE_SIZE)


def tiny_policy(family: str = "internvl", teacher_width: int = 32, **student_kw) -> VLAPolicy:
    student = VLAStudent(tiny_backbone(family), **student_kw).eval()
    head = ActionHead(teacher_width, student.robot.arm_dim, student.robot.gripper_dim)
    return VLAPolicy(student, ActionMapper(student.hidden_size, teacher_width), head).eval()


def window(robot: RobotSpec | None = None, batch_size: int = 2, num_steps: int = 4, seed: int = 0, **kw):
    return fake_window(robot or RobotSpec(), batch_size=batch_size, num_steps=num_steps, image_size=IMAGE_SIZE,
                       generator=torch.Generator().manual_seed(seed), **kw)
