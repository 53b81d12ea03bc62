"""The frozen MAE ViT encoder Seer reads images with, and the timm ``Block`` it shares with the image decoder.

Parameter names follow timm / the MAE repository (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``) so that
``mae_pretrain_vit_base.pth`` loads without renaming. timm itself is not a dependency.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """MAE's fixed 2-D sin-cos embedding, (grid_size**2 [+1], embed_dim) float32.

    Computed in numpy float32 exactly as Seer's copy of the MAE code does, so the values are bit-identical to
    the official ones (the float64 variant of the upstream MAE repository differs by up to 6.7e-7).
    """
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb = np.concatenate([_sincos_1d(embed_dim // 2, grid[0]), _sincos_1d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim], dtype=emb.dtype), emb], axis=0)
    return emb.astype(np.float32)


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float32)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


class Attention(nn.Module):
    """timm ``Attention``: fused qkv projection with bias, then an output projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf GELU, timm's default
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """timm ``Block`` (pre-LN, no layer scale, no drop path): the MAE encoder's and Seer's image decoder's."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, image_size: int, patch_size: int, dim: int):
        super().__init__()
        self.image_size = image_size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"the MAE encoder takes {self.image_size}x{self.image_size} images, "
                             f"got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)


class MAEEncoder(nn.Module):
    """MAE ViT encoder at mask ratio 0: (N, 3, H, W) CLIP-normalised images -> (N, 1 + patches, dim).

    Token 0 is the CLS token; the patch tokens stay in raster order. The official ``forward_encoder``
    permutes the patches at random even at mask ratio 0; nothing downstream depends on patch order (the
    perceiver has no positional input of its own), so skipping the shuffle changes outputs only at
    float-rounding level and makes the teacher deterministic.
    """

    def __init__(self, image_size: int = 224, patch_size: int = 16, dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0):
        super().__init__()
        grid = image_size // patch_size
        self.patch_embed = PatchEmbed(image_size, patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # MAE keeps the sin-cos table as a frozen parameter and it is a key of the MAE file, so a loaded file
        # overrides this construction-time value.
        self.pos_embed = nn.Parameter(
            torch.tensor(sincos_pos_embed_2d(dim, grid, cls_token=True)).unsqueeze(0), requires_grad=False
        )
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, eps=1e-6) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
