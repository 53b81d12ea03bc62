"""Seer's attention mask in its finetune / evaluation form (``atten_goal=0``, no ``atten_only_obs``).

Rows are queries, columns keys, True = may attend (Seer's additive 0; False = -inf). Per step t:

* every token of step t sees all group-A tokens (text, state, image latents, CLS) of steps 0..t, so A tokens
  of one step see each other bidirectionally and nothing of a later step;
* nobody sees group-B tokens (foresight and action queries), except that the action queries of step t see the
  foresight queries of step t. No row is ever all False.

The pretraining variants (goal-state, obs-only, random foresight dropout) are not needed by a frozen teacher.
"""

from __future__ import annotations

import torch
from torch import Tensor

from teachers.seer.config import SeerConfig


def seer_attention_mask(cfg: SeerConfig, num_steps: int, device: torch.device | str | None = None) -> Tensor:
    """(num_steps * T, num_steps * T) bool for ``num_steps`` steps of ``T = cfg.tokens_per_step`` tokens.

    Because the mask is step-causal, the mask for fewer steps than ``cfg.sequence_length`` equals the
    top-left block of the full one.
    """
    per_step = cfg.tokens_per_step
    n_a, n_obs = cfg.num_a_tokens, 2 * cfg.num_obs_tokens_per_image
    step = torch.arange(num_steps * per_step, device=device) // per_step
    within = torch.arange(num_steps * per_step, device=device) % per_step
    key_is_a = within < n_a
    key_is_obs = (within >= n_a) & (within < n_a + n_obs)
    query_is_action = within >= n_a + n_obs
    same_step = step[:, None] == step[None, :]
    sees_a = key_is_a[None, :] & (step[None, :] <= step[:, None])
    sees_own_foresight = query_is_action[:, None] & key_is_obs[None, :] & same_step
    return sees_a | sees_own_foresight
