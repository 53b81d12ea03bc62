"""Losses of the two training stages, masked by which steps and chunk entries are real."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vitavla.batch import RobotSpec


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over the entries where ``mask`` is True; ``mask`` broadcasts over trailing feature axes."""
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    while m.dim() < values.dim():
        m = m.unsqueeze(-1)
    m = m.expand_as(values)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` over the entries where ``mask`` (broadcast over trailing axes) is True; 0 if none."""
    return _masked_mean(values, mask)


def alignment_loss(student: Tensor, teacher: Tensor, valid: Tensor | None = None) -> Tensor:
    """Stage 1: MSE between mapped student hidden states and teacher hidden states, (B, T, Q, D) each."""
    if student.shape != teacher.shape:
        raise ValueError(f"student hidden {tuple(student.shape)} and teacher hidden {tuple(teacher.shape)} differ")
    return _masked_mean((student - teacher.to(student.dtype)) ** 2, valid)


ARM_LOSSES = ("mae", "smooth_l1")


def action_loss(pred, target: Tensor, mask: Tensor | None, robot: RobotSpec,
                gripper_weight: float = 0.01, arm_loss: str = "mae") -> tuple[Tensor, dict[str, Tensor]]:
    """Stage 2: arm term + ``gripper_weight`` * BCE on gripper targets.

    The arm term is the paper's MAE (``arm_loss="mae"``) or Seer's own smooth L1 with beta 1
    (``"smooth_l1"``): quadratic for errors under 1, so on normalised actions it regresses the mean of the
    labels seen at one observation, where MAE regresses their median. ``arm_mae`` is reported either way.
    ``pred`` is an :class:`~teachers.base.ActionOutput` with (B, T, C, ·) fields; ``target`` is
    (B, T, C, arm_dim + gripper_dim); ``mask`` (B, T, C) marks the chunk entries inside the episode.
    """
    if arm_loss not in ARM_LOSSES:
        raise ValueError(f"arm_loss must be one of {ARM_LOSSES}, got {arm_loss!r}")
    arm_t, grip_t = target[..., : robot.arm_dim], target[..., robot.arm_dim :]
    mae = _masked_mean((pred.arm - arm_t).abs(), mask)
    if arm_loss == "mae":
        arm = mae
    else:
        arm = _masked_mean(F.smooth_l1_loss(pred.arm, arm_t.to(pred.arm.dtype), reduction="none", beta=1.0), mask)
    bce = F.binary_cross_entropy_with_logits(pred.gripper_logit, grip_t.to(pred.gripper_logit.dtype),
                                             reduction="none")
    grip = _masked_mean(bce, mask)
    loss = arm + gripper_weight * grip
    return loss, {"arm_mae": mae.detach(), "gripper_bce": grip.detach()}


def gripper_accuracy(pred, target: Tensor, mask: Tensor | None, robot: RobotSpec) -> Tensor:
    hit = ((pred.gripper_logit > 0) == (target[..., robot.arm_dim :] > 0.5)).float()
    return _masked_mean(hit, mask)


def action_metrics(pred, target: Tensor, mask: Tensor | None, robot: RobotSpec,
                   gripper_weight: float = 0.01) -> dict[str, Tensor]:
    """The offline action metrics of :class:`~vitavla.modules.PolicyModule`, for any model's predictions.

    ``loss`` (MAE + ``gripper_weight`` * BCE), ``arm_mae``, ``gripper_bce`` and ``gripper_acc``, all detached,
    from :func:`action_loss` and :func:`gripper_accuracy` exactly as the student's validation computes them, so
    teacher and student numbers in one table are comparable.
    """
    loss, parts = action_loss(pred, target, mask, robot, gripper_weight)
    return {"loss": loss.detach(), **parts, "gripper_acc": gripper_accuracy(pred, target, mask, robot).detach()}


__all__ = ["ARM_LOSSES", "alignment_loss", "action_loss", "action_metrics", "gripper_accuracy", "masked_mean"]
