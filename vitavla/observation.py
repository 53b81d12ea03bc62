"""What a policy reads at one control step of closed-loop inference.

An :class:`Observation` is the inference-time counterpart of a training :class:`~vitavla.batch.Window`: the
newest step of B running episodes. Rollouts build it from simulator frames
(:func:`vitavla.rollout.episode.to_observation`), the policy server from client messages, and
:class:`~vitavla.streaming.StreamingPolicy` and the teacher policies consume it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Observation:
    """One control step of B environments: images uint8 (B, V, 3, H, W), state (B, state_dim), B strings."""

    images: Tensor
    state: Tensor
    instruction: list[str]
