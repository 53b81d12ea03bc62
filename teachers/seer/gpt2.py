"""Seer's GPT-2 backbone: HF GPT-2 blocks without token/position embeddings and without the causal mask.

Two details differ from a stock ``transformers.GPT2Model`` and both change the outputs:

* Seer's copy never applies GPT-2's built-in lower-triangular mask; the only mask is Seer's own (see
  ``mask.py``), under which tokens of a step see each other bidirectionally.
* Linear maps are HF ``Conv1D``: weights stored (in, out), y = x @ W + b. Keeping that layout (rather than
  ``nn.Linear`` plus transposes) makes our state dict identical to the official one, key for key and shape for
  shape; the square ``attn.c_proj`` would otherwise load untransposed without any shape error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Conv1D(nn.Module):
    """HF ``transformers.pytorch_utils.Conv1D``: an affine map with its weight stored (in, out)."""

    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class GPT2Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.c_attn = Conv1D(3 * dim, dim)
        self.c_proj = Conv1D(dim, dim)
        self.attn_dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        """x (B, N, D); allowed (N, N) bool, True where a query (row) may attend to a key (column)."""
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
                   for t in self.c_attn(x).chunk(3, dim=-1))
        # A boolean mask is the additive 0 / -inf mask Seer adds to the scaled scores.
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.attn_dropout if self.training else 0.0
        )
        return self.resid_dropout(self.c_proj(out.transpose(1, 2).flatten(2)))


class GPT2MLP(nn.Module):
    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.c_fc = Conv1D(4 * dim, dim)
        self.c_proj = Conv1D(dim, 4 * dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        # "gelu_new" = the tanh approximation, GPT-2's default activation.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class GPT2Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float, eps: float = 1e-5):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=eps)
        self.attn = GPT2Attention(dim, num_heads, dropout)
        self.ln_2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = GPT2MLP(dim, dropout)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x), allowed)
        return x + self.mlp(self.ln_2(x))


class GPT2Backbone(nn.Module):
    """``drop`` -> ``h.{i}`` blocks -> ``ln_f``, on input embeddings (keys ``h.i.*`` and ``ln_f.*``)."""

    def __init__(self, dim: int, num_layers: int, num_heads: int, dropout: float = 0.1, eps: float = 1e-5):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"GPT-2 width {dim} is not divisible by {num_heads} heads")
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(GPT2Block(dim, num_heads, dropout, eps) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(dim, eps=eps)

    def forward(self, inputs_embeds: Tensor, allowed: Tensor) -> Tensor:
        x = self.drop(inputs_embeds)
        for block in self.h:
            x = block(x, allowed)
        return self.ln_f(x)
