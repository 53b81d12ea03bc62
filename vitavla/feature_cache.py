"""Outputs of a frozen image tower, kept per image so that a training step pays only for its trainable parts.

In both stages the student's vision tower and projector are frozen and see the same demo frames epoch after
epoch, so their output for a frame never changes. :class:`ImageFeatureCache` keys each uint8 image by a hash of
its bytes, not by (episode, frame) ids: the key is the pixels themselves, so it stays right whatever the
datamodule (padding steps, several files, augmentations, whose new pixels are simply new keys).

Memory: one entry per distinct image, (tokens_per_image, hidden) values each: 9.8 MB for the quickstart's
two-task evidence run (4,800 frames, 2 views, 4 x 64 floats); at the paper's size (256 tokens x 3584 in bf16,
1.8 MB an image) an epoch of a large dataset does not fit, hence ``max_images``.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
from torch import Tensor


class ImageFeatureCache:
    """``embed(images)`` through a frozen tower, computing only images not seen before (up to ``max_images``
    are kept; past that, new images are computed every time)."""

    def __init__(self, max_images: int = 1_000_000):
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        self.max_images = int(max_images)
        self._store: dict[bytes, Tensor] = {}
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        """Forget every entry (the tower's weights, device or dtype changed)."""
        self._store.clear()

    @staticmethod
    def keys(images: Tensor) -> list[bytes]:
        """A 16-byte BLAKE2b of each image's pixels, salted with its shape (a resized image is another key)."""
        rows = images.detach().cpu().contiguous().numpy().reshape(len(images), -1)
        salt = hashlib.blake2b(repr(tuple(images.shape[1:])).encode(), digest_size=16)
        out = []
        for row in rows:  # about 8 us a 56 px image
            h = salt.copy()
            h.update(row)
            out.append(h.digest())
        return out

    def __call__(self, images: Tensor, embed: Callable[[Tensor], Tensor]) -> Tensor:
        """``images``: uint8 (N, 3, H, W) on any device; ``embed`` maps such a batch to (N, K, hidden).
        Returns ``embed(images)``, detached, from the cache where it can."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"ImageFeatureCache expects uint8 (N, 3, H, W) images, got {images.dtype} "
                             f"{tuple(images.shape)}")
        keys = self.keys(images)
        todo = list(dict.fromkeys(k for k in keys if k not in self._store))
        fresh: dict[bytes, Tensor] = {}
        if todo:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}  # first position of each key
            with torch.no_grad():
                out = embed(images[torch.tensor([first[k] for k in todo], device=images.device)])
            fresh = dict(zip(todo, out))
            for k, v in fresh.items():
                if len(self._store) >= self.max_images:
                    break
                self._store[k] = v
        self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        return torch.stack([self._store.get(k, fresh.get(k)) for k in keys])
