"""Seer's own training objective (``utils/train_utils.py`` of the official code), on vitavla Windows.

Total loss = 1.0 * smooth-L1(arm) + 0.01 * BCE(gripper) + 0.1 * foresight MSE, with the random-shift augmentation
applied to the CLIP-normalised images of every frame in training mode only.

One deliberate difference from the official loop: Seer loads ``S + future_steps`` frames per sample (13 for
CALVIN) so that every one of the S steps has a frame three steps ahead to predict. A Window holds exactly the
T steps the model reads, so the foresight loss covers the steps ``t`` with ``t + future_steps < T`` whose two
frames are both real (``Window.valid``); the last ``future_steps`` steps still get the action losses. With
T = 10 that is 7 of 10 steps for the auxiliary image term, while the action terms are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from vitavla.batch import Window
from vitavla.losses import masked_mean

if TYPE_CHECKING:
    from teachers.seer.teacher import SeerTeacher


@dataclass(frozen=True)
class SeerObjective:
    """Weights and augmentation of Seer's training loss (every released run uses these values)."""

    arm_weight: float = 1.0
    gripper_weight: float = 0.01
    image_weight: float = 0.1
    future_steps: int = 3
    """Foresight horizon: the frame at ``t + future_steps`` is the target of step ``t``."""
    static_pad: int = 10
    """Random-shift padding of the static camera (``--rgb_pad``) at ``reference_size`` pixels."""
    wrist_pad: int = 4
    """Random-shift padding of the wrist camera (``--gripper_pad``) at ``reference_size`` pixels."""
    reference_size: int = 224
    smooth_l1_beta: float = 1.0
    norm_pix_eps: float = 1e-6

    def pads(self, image_size: int) -> tuple[int, int]:
        """(static, wrist) padding for ``image_size`` pixels: Seer's 10 / 4 px at 224, scaled, at least 1."""
        scale = image_size / self.reference_size
        return max(1, round(self.static_pad * scale)), max(1, round(self.wrist_pad * scale))


def draw_shifts(num_frames: int, pad: int, device: torch.device | str = "cpu",
                generator: torch.Generator | None = None) -> Tensor:
    """Integer (x, y) crop offsets into the padded image, one pair per frame, each in [1, 2 * pad].

    Seer's ``forward_traj`` draws from [1, 2 * pad] independently per frame and axis: offset ``pad`` is the
    unshifted crop, and offset 0 (the largest shift up or left) is never drawn.
    """
    if pad < 1:
        raise ValueError(f"random-shift pad must be >= 1, got {pad}")
    return torch.randint(1, 2 * pad + 1, (num_frames, 2), device=device, generator=generator)


def random_shift(images: Tensor, pad: int, offsets: Tensor) -> Tensor:
    """Replicate-pad (N, C, H, W) images by ``pad`` and crop H x W at ``offsets`` (N, 2) = (x, y) per frame.

    Equal to the official replicate pad + ``grid_sample`` at an integer shift (which samples exactly at
    pixel centres), without interpolation round-off.
    """
    n, _, h, w = images.shape
    if offsets.shape != (n, 2):
        raise ValueError(f"offsets must be (N={n}, 2) integer (x, y) pairs, got {tuple(offsets.shape)}")
    if int(offsets.min()) < 0 or int(offsets.max()) > 2 * pad:
        raise ValueError(f"offsets must lie in [0, {2 * pad}] for pad {pad}, got "
                         f"[{int(offsets.min())}, {int(offsets.max())}]")
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    offsets = offsets.to(images.device)
    rows = offsets[:, 1, None] + torch.arange(h, device=images.device)  # (N, H)
    cols = offsets[:, 0, None] + torch.arange(w, device=images.device)  # (N, W)
    frame = torch.arange(n, device=images.device)[:, None, None]
    # Advanced indexing around the channel slice puts the indexed axes first: (N, H, W, C).
    return padded[frame, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def augment_views(images: Tensor, pads: tuple[int, ...], generator: torch.Generator | None = None
                  ) -> tuple[Tensor, list[Tensor]]:
    """Random shift of every frame of every view of (B, T, V, C, H, W) images; view ``v`` uses ``pads[v]``.

    Returns the shifted images and, per view, the drawn (B * T, 2) offsets.
    """
    b, t, v = images.shape[:3]
    if len(pads) != v:
        raise ValueError(f"got {len(pads)} random-shift pads for {v} views")
    views, drawn = [], []
    for i, pad in enumerate(pads):
        frames = images[:, :, i].flatten(0, 1)
        offsets = draw_shifts(frames.shape[0], pad, images.device, generator)
        views.append(random_shift(frames, pad, offsets).unflatten(0, (b, t)))
        drawn.append(offsets)
    return torch.stack(views, dim=2), drawn


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(N, 3, H, W) -> (N, (H/p) * (W/p), p * p * 3), patches in raster order, values ordered (p, q, c).

    Seer's (and MAE's) ``patchify``: ``einsum('nchpwq->nhwpqc')``.
    """
    n, c, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"images of {h}x{w} are not a multiple of patch_size {patch_size}")
    gh, gw = h // patch_size, w // patch_size
    x = images.reshape(n, c, gh, patch_size, gw, patch_size)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, gh * gw, patch_size * patch_size * c)


def normalize_patches(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """MAE ``norm_pix``: per patch, subtract the mean and divide by sqrt(var + eps).

    ``var`` is ``Tensor.var`` with its default Bessel correction, as in MAE's and Seer's code.
    """
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def foresight_targets(images: Tensor, patch_size: int, eps: float = 1e-6) -> Tensor:
    """(B, T, V, 3, H, W) normalised frames -> (B, T, V, patches, p * p * 3) per-patch-normalised targets."""
    b, t, v = images.shape[:3]
    patches = patchify(images.flatten(0, 2), patch_size)
    return normalize_patches(patches, eps).unflatten(0, (b, t, v))


def foresight_loss(image_pred: Tensor, images: Tensor, valid: Tensor, patch_size: int,
                   future_steps: int = 3, eps: float = 1e-6) -> Tensor:
    """0.5 * (MSE_primary + MSE_wrist) between the prediction at step t and the frame at t + future_steps.

    Args:
        image_pred: (B, T, 2, patches, p * p * 3), the foresight head's output per step and camera.
        images: (B, T, 2, 3, H, W) the (augmented, normalised) frames the model read.
        valid: (B, T) real steps; a step counts only when it and its target frame are both real.
    Steps without a frame ``future_steps`` ahead inside the window are left out (see the module doc); when no
    step has one the loss is an exact zero that still reaches the foresight head's parameters.
    """
    t = images.shape[1]
    if image_pred.shape[:3] != images.shape[:3]:
        raise ValueError(f"image_pred {tuple(image_pred.shape)} and images {tuple(images.shape)} disagree on "
                         "(B, T, views)")
    span = t - future_steps
    if span <= 0:
        return image_pred.sum() * 0.0
    target = foresight_targets(images[:, future_steps:], patch_size, eps).to(image_pred.dtype)
    mask = valid[:, :span] & valid[:, future_steps:]
    # Both cameras have the same number of values, so the mean over them is 0.5 * (primary + wrist).
    return masked_mean((image_pred[:, :span] - target) ** 2, mask)


def seer_training_loss(teacher: SeerTeacher, window: Window, objective: SeerObjective = SeerObjective()
                       ) -> tuple[Tensor, dict[str, Tensor]]:
    """Seer's objective on a Window: (total, {"arm", "gripper", "image"}), parts detached.

    The random shift runs only when ``teacher.training`` is True; the same shifted frames feed the model and
    serve as foresight targets.
    """
    window = window.validate(teacher.robot, image_size=teacher.image_size, max_steps=teacher.max_steps,
                             require_actions=True)
    images = teacher.normalize_images(window.images)
    if teacher.training:
        with torch.no_grad():
            images, _ = augment_views(images, objective.pads(images.shape[-1]))
    out = teacher.run(window, images, predict_images=True)
    b, t = window.batch_size, window.num_steps
    arm_dim = teacher.robot.arm_dim
    target = window.actions.to(out.arm.device, out.arm.dtype)
    mask = window.action_valid.to(out.arm.device)

    arm = masked_mean(F.smooth_l1_loss(out.arm, target[..., :arm_dim], reduction="none",
                                       beta=objective.smooth_l1_beta), mask)
    gripper = masked_mean(F.binary_cross_entropy_with_logits(out.gripper_logit, target[..., arm_dim:],
                                                             reduction="none"), mask)
    image = foresight_loss(out.image_pred.unflatten(0, (b, t)), images, window.valid.to(images.device),
                           teacher.cfg.patch_size, objective.future_steps, objective.norm_pix_eps)
    total = objective.arm_weight * arm + objective.gripper_weight * gripper + objective.image_weight * image
    return total, {"arm": arm.detach(), "gripper": gripper.detach(), "image": image.detach()}


__all__ = ["SeerObjective", "augment_views", "draw_shifts", "foresight_loss", "foresight_targets",
           "normalize_patches", "patchify", "random_shift", "seer_training_loss"]
