"""Stage 1 (alignment): map the student's action-token states onto a frozen teacher's hidden states."""

from __future__ import annotations

import torch

from teachers.base import Teacher
from vitavla.batch import Window
from vitavla.losses import alignment_loss
from vitavla.modules.common import OptimConfig, WindowModule, configure_adamw
from vitavla.policy import VLAPolicy
from vitavla.student import ActionMapper, VLAStudent


def check_compatible(student: VLAStudent, teacher: Teacher, mapper_out_dim: int | None) -> None:
    """Fail at construction, naming both sides, when student and teacher cannot be paired."""
    student.robot.check_compatible(teacher.robot, "student", f"teacher ({type(teacher).__name__})")
    if mapper_out_dim is not None and mapper_out_dim != teacher.hidden_size:
        raise ValueError(f"mapper_out_dim={mapper_out_dim} but the teacher ({type(teacher).__name__}) has "
                         f"hidden size {teacher.hidden_size}; the mapper must output the teacher's width")
    if teacher.num_action_queries != student.robot.action_chunk:
        raise ValueError(f"teacher has {teacher.num_action_queries} action queries per step but the student "
                         f"predicts action_chunk={student.robot.action_chunk}")
    if teacher.max_steps is not None and student.max_steps > teacher.max_steps:
        raise ValueError(f"student.max_steps={student.max_steps} exceeds the teacher's history "
                         f"{teacher.max_steps} ({type(teacher).__name__})")
    if teacher.image_size != student.backbone.image_size:
        raise ValueError(f"teacher reads {teacher.image_size}px images but the student backbone is "
                         f"configured for {student.backbone.image_size}px; both read the same Window")


class DistillationModule(WindowModule):
    """Stage 1: trains the state encoder, the action token and the action mapper; everything else frozen.

    Loss: MSE(mapper(student action hidden), teacher action hidden), over every valid step and query.
    """

    def __init__(self, student: VLAStudent, teacher: Teacher, mapper_hidden_dim: int | None = None,
                 mapper_out_dim: int | None = None, optim: OptimConfig | None = None):
        """
        Args:
            student: the VLM student (backbone + state encoder + action token).
            teacher: the pretrained action expert, frozen here.
            mapper_hidden_dim: hidden width of the 3-layer mapper (default: the teacher's hidden size).
            mapper_out_dim: expected mapper output; must equal the teacher's hidden size when given.
            optim: optimizer and schedule (paper Table 5: lr 1e-4, 1 warmup epoch, 3 epochs).
        """
        super().__init__()
        check_compatible(student, teacher, mapper_out_dim)
        self.student = student
        self.teacher = teacher.freeze()
        self.mapper = ActionMapper(student.hidden_size, teacher.hidden_size, mapper_hidden_dim)
        self.optim = optim or OptimConfig()
        self.student.requires_grad_(False)
        for part in (self.student.state_encoder, self.student.action_token, self.mapper):
            part.requires_grad_(True)

    def student_module(self) -> VLAStudent:
        return self.student

    def parameter_groups(self):
        return {
            "vision": torch.nn.ModuleList(self.student.backbone.vision_modules()),
            "llm": self.student.backbone.language_model(),
            "state_encoder": self.student.state_encoder,
            "action_token": self.student.action_token,
            "action_mapper": self.mapper,
            "teacher": self.teacher,
        }

    def losses(self, batch: Window) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            target = self.teacher.encode(batch)
        mapped = self.mapper(self.student(batch))
        loss = alignment_loss(mapped.float(), target.float(), batch.valid)
        return {"loss": loss, "target_rms": target.float().pow(2).mean().sqrt()}

    def training_step(self, batch: Window, batch_idx: int):
        out = self.losses(batch)
        self.log("train/align_mse", out["loss"], prog_bar=True, batch_size=batch.batch_size)
        return out["loss"]

    def validation_step(self, batch: Window, batch_idx: int):
        out = self.losses(batch)
        self.log("val/align_mse", out["loss"], prog_bar=True, sync_dist=True, batch_size=batch.batch_size)
        self.log("val/teacher_rms", out["target_rms"], sync_dist=True, batch_size=batch.batch_size)

    test_step = validation_step

    def configure_optimizers(self):
        return configure_adamw(self, self.optim)

    def deployable_policy(self) -> VLAPolicy:
        """What ``vitavla export`` writes for a stage-1 checkpoint: the aligned student, its mapper and the
        teacher's action head (the parts shared, not copied). Alignment trains the mapper to land on the
        teacher's hidden states, which that head decodes into actions; it is also the policy that stage 2's
        ``two_stage`` mode starts fine-tuning from."""
        return VLAPolicy(self.student, self.mapper, self.teacher.action_head)
