"""Seer's own training objective (``utils/train_utils.py`` of the official code), on vitavla Windows.

Total loss = 1.0 * smooth-L1(arm) + 0.01 * BCE(gripper) + 0.1 * foresight MSE, with the random-shift augmentation
of every frame in training mode only (Seer shifts the CLIP-normalised frames; shifting the uint8 frames before
normalising gives the same values for a quarter of the bytes).

Windows. Seer loads ``S + future_steps`` frames per training sample (``window_size`` 13 for CALVIN's
S = 10, 10 for LIBERO's S = 7, in the official training scripts) so that every one of its S steps has a
frame ``future_steps`` (3) ahead to predict. :func:`seer_training_loss` takes such a window the same way:

- ``T = S + future_steps`` (``S = teacher.max_steps``, Seer's ``sequence_length``): the model reads steps
  ``[0, S)`` (images, states, instruction, action labels and masks: ``Window.slice_steps(0, S)``) and the
  foresight target of step ``t`` is frame ``t + future_steps`` of the whole window. The random shift is drawn
  once for all T frames, as Seer augments the whole loaded sequence, so a frame the model reads and the same
  frame as a target are shifted alike. The trailing frames carry no action loss.
- ``T <= S``: the model reads the whole window and the targets are inside it, so only the steps with
  ``t + future_steps < T`` get the foresight term (the action terms cover every step).
- any other ``T`` is an error naming the window length, ``sequence_length`` and ``future_steps``.

In both cases a step's foresight term counts only when step ``t`` and frame ``t + future_steps`` are both real
(``Window.valid``). Teacher training configs therefore cut windows of ``num_steps = sequence_length + 3``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from vitavla.batch import BatchError, Window
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
    pixel centres), without interpolation round-off. Works on any dtype: a shift commutes with the per-pixel
    CLIP normalisation, so training shifts the uint8 frames (a quarter of the bytes) and normalises after.
    """
    n, _, h, w = images.shape
    if offsets.shape != (n, 2):
        raise ValueError(f"offsets must be (N={n}, 2) integer (x, y) pairs, got {tuple(offsets.shape)}")
    if int(offsets.min()) < 0 or int(offsets.max()) > 2 * pad:
        raise ValueError(f"offsets must lie in [0, {2 * pad}] for pad {pad}, got "
                         f"[{int(offsets.min())}, {int(offsets.max())}]")
    # Replicate padding by concatenating edge rows/columns: F.pad's replicate mode refuses integer dtypes,
    # and this is a plain copy (4x faster than an index_select on uint8).
    edge = (n, images.shape[1])
    padded = torch.cat([images[:, :, :1].expand(*edge, pad, w), images,
                        images[:, :, -1:].expand(*edge, pad, w)], dim=2)
    padded = torch.cat([padded[..., :1].expand(*edge, h + 2 * pad, pad), padded,
                        padded[..., -1:].expand(*edge, h + 2 * pad, pad)], dim=3)
    # One slice per frame: ~4x faster than a gather with per-pixel indices for these small frames.
    return torch.stack([padded[i, :, y:y + h, x:x + w] for i, (x, y) in enumerate(offsets.tolist())])


def augment_views(images: Tensor, pads: tuple[int, ...], generator: torch.Generator | None = None,
                  frames: list[int] | None = None) -> tuple[Tensor, list[Tensor]]:
    """Random shift of every frame of every view of (B, T, V, C, H, W) images; view ``v`` uses ``pads[v]``.

    ``frames``: shift and return only these time steps, (B, len(frames), V, C, H, W). Offsets are still
    drawn for all T frames, so the random stream, and with it a seeded training run, is the same as
    shifting the whole window and indexing after.

    Returns the shifted images and, per view, the (B * len(frames), 2) offsets they used.
    """
    b, t, v = images.shape[:3]
    if len(pads) != v:
        raise ValueError(f"got {len(pads)} random-shift pads for {v} views")
    keep = slice(None) if frames is None else list(frames)  # a slice: no copy of the whole window
    kept = t if frames is None else len(keep)
    views, drawn = [], []
    for i, pad in enumerate(pads):
        offsets = draw_shifts(b * t, pad, images.device, generator).unflatten(0, (b, t))[:, keep].flatten(0, 1)
        shifted = random_shift(images[:, keep, i].flatten(0, 1), pad, offsets)
        views.append(shifted.unflatten(0, (b, kept)))
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
        image_pred: (B, S, 2, patches, p * p * 3), the foresight head's output per model step and camera.
        images: (B, T, 2, 3, H, W) the (augmented, normalised) frames of the whole window, T >= S: the S
            frames the model read, then any trailing target-only frames (T = S + future_steps gives every
            step one).
        valid: (B, T) real frames; a step counts only when it and its target frame are both real.
    Steps without a frame ``future_steps`` ahead inside ``images`` are left out (see the module doc); when no
    step has one the loss is an exact zero that still reaches the foresight head's parameters.
    """
    s, t = image_pred.shape[1], images.shape[1]
    if image_pred.shape[0] != images.shape[0] or image_pred.shape[2] != images.shape[2] or s > t:
        raise ValueError(f"image_pred {tuple(image_pred.shape)} and images {tuple(images.shape)} disagree on "
                         "(B, views), or there are more predicted steps than frames")
    if valid.shape != images.shape[:2]:
        raise ValueError(f"valid {tuple(valid.shape)} does not match the frames' (B, T) = "
                         f"{tuple(images.shape[:2])}")
    span = min(s, t - future_steps)
    if span <= 0:
        return image_pred.sum() * 0.0
    ahead = slice(future_steps, future_steps + span)
    target = foresight_targets(images[:, ahead], patch_size, eps).to(image_pred.dtype)
    mask = valid[:, :span] & valid[:, ahead]
    # Both cameras have the same number of values, so the mean over them is 0.5 * (primary + wrist).
    return masked_mean((image_pred[:, :span] - target) ** 2, mask)


def split_training_window(window: Window, sequence_length: int | None, future_steps: int) -> Window:
    """The steps the model reads of a training window: all of it when ``T <= sequence_length``, the first
    ``sequence_length`` when ``T = sequence_length + future_steps``; any other ``T`` is an error."""
    t = window.num_steps
    if sequence_length is None or t <= sequence_length:
        return window
    if future_steps > 0 and t == sequence_length + future_steps:
        return window.slice_steps(0, sequence_length)
    s, f = sequence_length, future_steps
    raise BatchError(f"a Seer training window has {t} steps, but with sequence_length={s} and "
                     f"future_steps={f} it must have either at most {s} steps (foresight targets inside the "
                     f"window) or exactly {s} + {f} = {s + f} (the model reads the first {s}, the last {f} "
                     "are foresight targets only); set the datamodule's num_steps accordingly")


def seer_training_loss(teacher: SeerTeacher, window: Window, objective: SeerObjective = SeerObjective()
                       ) -> tuple[Tensor, dict[str, Tensor]]:
    """Seer's objective on a Window: (total, {"arm", "gripper", "image"}), parts detached.

    ``window`` has at most ``S = teacher.max_steps`` steps, or ``S + objective.future_steps`` whose trailing
    frames are foresight targets only (see the module doc). The random shift runs only when
    ``teacher.training`` is True, drawn once for every frame the loss uses; the same shifted frames feed the
    model and serve as foresight targets.
    """
    window = window.validate(teacher.robot, image_size=teacher.image_size, require_actions=True)
    seen = split_training_window(window, teacher.max_steps, objective.future_steps)
    seen = seen.validate(teacher.robot, image_size=teacher.image_size, max_steps=teacher.max_steps,
                         require_actions=True)
    images, valid, future = window.images, window.valid, objective.future_steps
    b, s = seen.batch_size, seen.num_steps
    # A zero foresight weight skips the image decoder and its targets (about 40% of a small teacher's step):
    # the model then reads only its own S frames.
    foresight = objective.image_weight != 0
    if not foresight:
        keep = list(range(s)) if window.num_steps > s else None
    elif s < future and window.num_steps == s + future:
        # The model reads frames [0, S) and predicts [future, S + future): the frames between are never
        # used (the quickstart's 1-step teacher reads frame 0 and predicts frame 3 of 4), so they are
        # neither shifted nor normalised: half of a 1-step window's image work. Kept frames in order, step
        # t's target is then frame S + t.
        keep = [*range(s), *range(future, s + future)]
        valid, future = valid[:, keep], s
    else:
        keep = None  # every frame is used
    if teacher.training:
        with torch.no_grad():
            images, _ = augment_views(images, objective.pads(images.shape[-1]), frames=keep)
    elif keep is not None:
        images = images[:, keep]
    images = teacher.normalize_images(images)
    out = teacher.run(seen, images[:, :s], predict_images=foresight)
    arm_dim = teacher.robot.arm_dim
    target = seen.actions.to(out.arm.device, out.arm.dtype)
    mask = seen.action_valid.to(out.arm.device)

    arm = masked_mean(F.smooth_l1_loss(out.arm, target[..., :arm_dim], reduction="none",
                                       beta=objective.smooth_l1_beta), mask)
    gripper = masked_mean(F.binary_cross_entropy_with_logits(out.gripper_logit, target[..., arm_dim:],
                                                             reduction="none"), mask)
    if foresight:
        image = foresight_loss(out.image_pred.unflatten(0, (b, s)), images, valid.to(images.device),
                               teacher.cfg.patch_size, future, objective.norm_pix_eps)
    else:
        image = arm.new_zeros(())
    total = objective.arm_weight * arm + objective.gripper_weight * gripper + objective.image_weight * image
    return total, {"arm": arm.detach(), "gripper": gripper.detach(), "image": image.detach()}


__all__ = ["SeerObjective", "augment_views", "draw_shifts", "foresight_loss", "foresight_targets",
           "normalize_patches", "patchify", "random_shift", "seer_training_loss", "split_training_window"]
