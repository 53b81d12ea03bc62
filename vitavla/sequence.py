"""Token layout of the student's interleaved sequence and its attention mask.

Per step ``t`` the language model sees (``V`` views, ``K`` tokens per image, ``L`` instruction tokens)::

    [ view0: K ][ view1: K ][ instruction: L ][ state: 1 ][ action query: 3 ]

(the instruction block moves to the very front, once, with ``instruction_per_step=False``). Everything
except the action queries is an *observation* token.

Mask ``action_isolated`` (default): causal over the flattened window, and no token may attend to an action
query other than itself. So the action queries of step ``t`` read every observation token of steps <= t,
and nothing downstream depends on them, which is what lets streaming inference drop them from the KV cache
after reading their outputs. Mask ``causal`` is the plain causal mask, kept for ablations.
Instruction padding (batches of instructions with different lengths) is masked as keys and skipped by the
positions, so a sample's outputs do not depend on the other samples in its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

IMAGE, TEXT, STATE, ACTION = 0, 1, 2, 3
AttentionMode = Literal["action_isolated", "causal"]


@dataclass
class TokenMeta:
    """Per-token bookkeeping for a block of the sequence, all (B, N)."""

    kind: Tensor
    """IMAGE / TEXT / STATE / ACTION."""
    real: Tensor
    """False for instruction padding."""
    order: Tensor
    """Index in the flattened sequence; orders of cached keys precede those of new queries."""

    def cat(self, other: TokenMeta) -> TokenMeta:
        return TokenMeta(*(torch.cat([a, b], dim=1) for a, b in
                           ((self.kind, other.kind), (self.real, other.real), (self.order, other.order))))

    def keep(self, index: Tensor) -> TokenMeta:
        """Columns ``index`` (1-D) of every field."""
        return TokenMeta(self.kind[:, index], self.real[:, index], self.order[:, index])

    @property
    def length(self) -> int:
        return self.kind.shape[1]


def allowed_attention(queries: TokenMeta, keys: TokenMeta, mode: AttentionMode) -> Tensor:
    """Bool (B, Q, K): may query q attend to key k."""
    q_order, k_order = queries.order[:, :, None], keys.order[:, None, :]
    same = q_order == k_order
    ok = (k_order <= q_order) & keys.real[:, None, :]
    if mode == "action_isolated":
        ok = ok & ((keys.kind[:, None, :] != ACTION) | same)
    elif mode != "causal":
        raise ValueError(f"attention mode must be 'action_isolated' or 'causal', got {mode!r}")
    # Every row keeps its own diagonal so padded queries never produce an all-masked (NaN) softmax.
    return ok | same


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool (B, Q, K) -> additive float (B, 1, Q, K): 0 where allowed, the dtype's minimum elsewhere."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def positions_from_real(real: Tensor, start: Tensor | int = 0) -> Tensor:
    """Rotary positions that count only real tokens: padding takes its predecessor's position."""
    pos = torch.cumsum(real.long(), dim=1) - 1
    return pos.clamp_min(0) + (start if isinstance(start, int) else start[:, None])
