"""The one image resize of vitavla: training windows (datamodules) and rollout observations use it alike.

A policy must see at evaluation the pixels it was trained on. Training resizes (n, H, W, 3) frame stacks in
the DataLoader workers, a rollout resizes one H x W x 3 frame per view and step; both go through
:func:`resize_uint8`, so a frame rendered at the size of the demonstrations gives bit-identical model inputs
on both paths (tested in ``tests/rollout/test_train_eval_parity.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def resize_uint8(frames: np.ndarray, size: int) -> torch.Tensor:
    """uint8 channels-last frames -> uint8 channels-first, ``size`` x ``size``: bilinear, antialiased when
    downscaling; no interpolation when the frames already have that size.

    ``frames``: (n, H, W, 3) -> (n, 3, size, size), or one (H, W, 3) frame -> (3, size, size). The result
    may be a strided (channels-last) view; callers copy it into their own buffers (``torch.stack``, a window
    slot), so a copy here would be wasted.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim not in (3, 4) or frames.shape[-1] != 3:
        raise ValueError(f"resize_uint8 frames must be uint8 (H, W, 3) or (n, H, W, 3), got {frames.dtype} "
                         f"{frames.shape}")
    if size < 1:
        raise ValueError(f"resize_uint8 size must be >= 1, got {size}")
    single = frames.ndim == 3
    x = torch.from_numpy(np.ascontiguousarray(frames))
    x = (x[None] if single else x).permute(0, 3, 1, 2)
    if x.shape[-2:] != (size, size):
        # uint8 in, uint8 out: torch's channels-last uint8 kernel is ~6x faster than a float round trip and
        # rounds the same way on every call site. Antialiasing only changes downscaling, and upscaling
        # (CALVIN's 84/200 px -> 224) is 2x faster without it.
        antialias = x.shape[-2] > size or x.shape[-1] > size
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=antialias, align_corners=False)
    return x[0] if single else x


def upscale_nearest(frame: np.ndarray, min_size: int) -> np.ndarray:
    """H x W x 3 -> the frame repeated by the smallest integer factor that makes its shorter side at least
    ``min_size`` (unchanged if it already is): blocky but exact pixels, for videos and contact sheets."""
    frame = np.asarray(frame)
    factor = max(1, -(-min_size // max(1, min(frame.shape[:2]))))
    if factor == 1:
        return frame
    return np.repeat(np.repeat(frame, factor, axis=0), factor, axis=1)


def normalize_images(images: Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype) -> Tensor:
    """uint8 (..., 3, H, W) -> ``dtype``, normalized per channel: ``(x / 255 - mean) / std`` (mean and std in
    [0, 1] units). The one normalisation of model inputs: student backbones and teachers (Seer: CLIP's
    statistics) both call it."""
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    if images.dim() < 3 or images.shape[-3] != len(mean) or len(mean) != len(std):
        raise ValueError(f"images (..., {len(mean)}, H, W) and per-channel mean/std expected, got images "
                         f"{tuple(images.shape)}, {len(mean)} means, {len(std)} stds")
    # (x / 255 - mean) / std as one fused multiply-add on x: two passes over the pixels instead of four
    # (this was 30% of a tiny student's training step on CPU).
    scale = torch.tensor([1.0 / (255.0 * v) for v in std], dtype=dtype, device=images.device).view(-1, 1, 1)
    bias = torch.tensor([-m / v for m, v in zip(mean, std)], dtype=dtype, device=images.device).view(-1, 1, 1)
    return torch.addcmul(bias, images.to(dtype), scale)


__all__ = ["normalize_images", "resize_uint8", "upscale_nearest"]
