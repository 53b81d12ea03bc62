"""open_flamingo's perceiver resampler as Seer configures it (no media/frame embeddings).

Module layout mirrors the original so checkpoint keys match: ``latents``,
``layers.i.0.{norm_media,norm_latents,to_q,to_kv,to_out}``, ``layers.i.1.{0,1,3}`` (LayerNorm, Linear, GELU,
Linear) and the final ``norm``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        inner = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: Tensor, latents: Tensor) -> Tensor:
        """media (N, M, dim), latents (N, L, dim) -> (N, L, dim)."""
        media = self.norm_media(media)
        latents = self.norm_latents(latents)
        q = self.to_q(latents)
        # Latents attend to the media and to themselves.
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        sim = (q * self.scale) @ k.transpose(-1, -2)
        # The original subtracts the row max before its softmax; softmax does the same internally, so the
        # explicit subtraction is kept only to stay close to the reference's rounding.
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        out = sim.softmax(dim=-1) @ v
        return self.to_out(out.transpose(1, 2).flatten(2))


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    inner = dim * mult
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False)
    )


class PerceiverResampler(nn.Module):
    """(N, M, dim) media tokens -> (N, num_latents, dim); one module shared by both cameras in Seer."""

    def __init__(self, dim: int, num_latents: int, depth: int = 3, dim_head: int = 64, heads: int = 8,
                 ff_mult: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, media: Tensor) -> Tensor:
        latents = self.latents.unsqueeze(0).expand(media.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = attn(media, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)
