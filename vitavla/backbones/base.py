"""The backbone adapter: the only code that knows a VLM family.

The student needs five things from a vision-language model: its width, a tokenizer, image embeddings
(a fixed number of tokens per image), token embeddings, and a language-model forward over
``inputs_embeds`` with a custom 4-D mask, explicit positions and a KV cache. An adapter provides them over a
stock ``transformers`` class; everything else in vitavla is family-agnostic.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class BackboneOutput:
    hidden: Tensor
    """Last hidden states of the language model, (B, L, hidden_size)."""
    cache: object | None = None
    """The KV cache after this call (a ``transformers`` Cache), when ``use_cache`` was set."""


class Backbone(nn.Module, ABC):
    """A VLM wrapped for interleaved image/text/state/action sequences.

    Subclasses set ``hidden_size``, ``image_size`` and ``tokens_per_image`` and implement the abstract
    methods. Images arrive as uint8 (N, 3, H, W) on the model's device; the adapter owns normalization.
    """

    hidden_size: int
    image_size: int
    tokens_per_image: int

    @abstractmethod
    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens the student does not want."""

    @abstractmethod
    def embed_tokens(self, ids: Tensor) -> Tensor:
        """(..., L) long -> (..., L, hidden_size)."""

    @abstractmethod
    def embed_images(self, images: Tensor) -> Tensor:
        """uint8 (N, 3, H, W) -> (N, tokens_per_image, hidden_size)."""

    @abstractmethod
    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor,
                past_key_values=None, use_cache: bool = False) -> BackboneOutput:
        """Language-model forward. ``attention_mask`` is additive float (B, 1, L, K) with K = past + L."""

    @abstractmethod
    def vision_modules(self) -> list[nn.Module]:
        """Modules that turn pixels into LLM-width tokens (vision tower and projector): frozen in both stages."""

    @abstractmethod
    def language_model(self) -> nn.Module:
        """The decoder-only LLM (embeddings and layers) that stage 2 fine-tunes."""

    def new_cache(self):
        """An empty KV cache for streaming inference."""
        from transformers import DynamicCache

        return DynamicCache()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


def pool_tokens(features: Tensor, tokens: int, mode: str = "bilinear") -> Tensor:
    """Resize a square grid of tokens (N, G*G, H) to (N, tokens, H), ``tokens`` a perfect square.

    VITA-1.5 pools video frames this way (bilinear resize of the token grid) to get 49 = 7x7 tokens.
    """
    n, length, h = features.shape
    side = int(round(length ** 0.5))
    out_side = int(round(tokens ** 0.5))
    if side * side != length:
        raise ValueError(f"cannot pool {length} image tokens: not a square grid")
    if out_side * out_side != tokens:
        raise ValueError(f"tokens_per_image={tokens} must be a perfect square (e.g. 49 = 7x7)")
    if out_side == side:
        return features
    grid = features.transpose(1, 2).reshape(n, h, side, side)
    if mode == "bilinear":
        grid = F.interpolate(grid, size=(out_side, out_side), mode="bilinear", align_corners=False)
    elif mode == "avg":
        grid = F.adaptive_avg_pool2d(grid, (out_side, out_side))
    else:
        raise ValueError(f"unknown pooling mode {mode!r}; expected 'bilinear' or 'avg'")
    return grid.flatten(2).transpose(1, 2)
