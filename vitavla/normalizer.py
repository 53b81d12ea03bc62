"""Action normalization: arm values into the teacher head's range [-1, 1], gripper into [0, 1]; optionally the
proprioceptive state to zero mean and unit variance.

One :class:`Normalizer` is fitted per dataset (by the datamodule, see :mod:`datamodules.normalization`),
saved inside every checkpoint (plain lists: loadable with ``weights_only=True``) and inverted at inference by
the rollout executors and the policy server. The gripper convention (which raw value means "target 1")
travels with it. It lives in the core package because training data, rollouts and serving all read it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Mode = Literal["minmax", "quantile", "identity"]


@dataclass
class Normalizer:
    """Per-dimension affine maps. ``arm_low``/``arm_high`` map to -1/+1; ``gripper_low``/``gripper_high`` to 0/1.

    A dimension whose range is zero maps to 0 (arm) or 0 (gripper) and un-normalizes back to its constant.
    """

    arm_low: list[float]
    arm_high: list[float]
    gripper_low: list[float]
    gripper_high: list[float]
    mode: Mode = "minmax"
    gripper_convention: str = ""
    """Human-readable meaning of gripper target 1, e.g. ``"1 = close (LIBERO: -1 open / +1 close)"``."""
    meta: dict = field(default_factory=dict)
    state_mean: list[float] | None = None
    """Per-dimension mean of the state the model reads; None (the default) = states pass through raw."""
    state_std: list[float] | None = None
    """Per-dimension scale of the state (``state_mean`` is subtracted, then divided by this)."""

    @property
    def arm_dim(self) -> int:
        return len(self.arm_low)

    @property
    def gripper_dim(self) -> int:
        return len(self.gripper_low)

    @classmethod
    def identity(cls, arm_dim: int, gripper_dim: int, gripper_low: float = 0.0, gripper_high: float = 1.0,
                 gripper_convention: str = "") -> Normalizer:
        """Arm already in [-1, 1] (e.g. CALVIN rel_actions); gripper mapped from [low, high] to [0, 1]."""
        return cls([-1.0] * arm_dim, [1.0] * arm_dim, [gripper_low] * gripper_dim, [gripper_high] * gripper_dim,
                   mode="identity", gripper_convention=gripper_convention)

    @classmethod
    def fit(cls, actions: np.ndarray, arm_dim: int, mode: Mode = "minmax", quantiles: tuple[float, float] = (0.01, 0.99),
            gripper_range: tuple[float, float] | None = None, gripper_convention: str = "") -> Normalizer:
        """Statistics of ``actions`` (N, arm_dim + gripper_dim). ``gripper_range`` fixes the gripper map
        (e.g. (-1, 1) for a ±1 command); otherwise the gripper uses the data's min/max."""
        a = np.asarray(actions, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] <= arm_dim:
            raise ValueError(f"Normalizer.fit needs actions of shape (N, >{arm_dim}), got {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError("Normalizer.fit: actions contain NaN or inf")
        arm, grip = a[:, :arm_dim], a[:, arm_dim:]
        if mode == "quantile":
            low, high = np.quantile(arm, quantiles[0], axis=0), np.quantile(arm, quantiles[1], axis=0)
        elif mode == "minmax":
            low, high = arm.min(0), arm.max(0)
        elif mode == "identity":
            low, high = -np.ones(arm_dim), np.ones(arm_dim)
        else:
            raise ValueError(f"normalization mode must be minmax, quantile or identity, got {mode!r}")
        if gripper_range is None:
            g_low, g_high = grip.min(0), grip.max(0)
        else:
            g_low = np.full(grip.shape[1], gripper_range[0], dtype=np.float64)
            g_high = np.full(grip.shape[1], gripper_range[1], dtype=np.float64)
        return cls(low.tolist(), high.tolist(), g_low.tolist(), g_high.tolist(), mode=mode,
                   gripper_convention=gripper_convention, meta={"num_samples": int(a.shape[0])})

    def with_state_stats(self, states: np.ndarray, raw_dims: Sequence[int] = (), min_std: float = 1e-3
                         ) -> Normalizer:
        """A copy that also standardises states: ``(state - mean) / max(std, min_std)`` per dimension.

        ``states``: (N, state_dim) raw states of the training episodes. ``raw_dims`` stay as they are (mean 0,
        scale 1), e.g. binary gripper flags that models threshold at 0.5. ``min_std`` keeps a (nearly)
        constant dimension from being blown up into noise.
        """
        x = np.asarray(states, dtype=np.float64)
        if x.ndim != 2 or len(x) == 0:
            raise ValueError(f"Normalizer.with_state_stats needs states of shape (N > 0, state_dim), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("Normalizer.with_state_stats: states contain NaN or inf")
        mean, std = x.mean(0), np.maximum(x.std(0), min_std)
        for d in raw_dims:
            mean[d], std[d] = 0.0, 1.0
        return replace(self, state_mean=mean.tolist(), state_std=std.tolist())

    @property
    def normalizes_state(self) -> bool:
        return self.state_mean is not None

    def normalize_state(self, state: Tensor) -> Tensor:
        """Raw (..., state_dim) -> standardised; unchanged when no state statistics were fitted."""
        if self.state_mean is None:
            return state
        if state.shape[-1] != len(self.state_mean):
            raise ValueError(f"state has {state.shape[-1]} values but the normalizer was fitted on "
                             f"{len(self.state_mean)}-D states")
        mean = torch.tensor(self.state_mean, dtype=state.dtype, device=state.device)
        std = torch.tensor(self.state_std, dtype=state.dtype, device=state.device)
        return (state - mean) / std

    def _arm(self, like: Tensor) -> tuple[Tensor, Tensor]:
        low = torch.tensor(self.arm_low, dtype=like.dtype, device=like.device)
        high = torch.tensor(self.arm_high, dtype=like.dtype, device=like.device)
        return low, high

    def _grip(self, like: Tensor) -> tuple[Tensor, Tensor]:
        low = torch.tensor(self.gripper_low, dtype=like.dtype, device=like.device)
        high = torch.tensor(self.gripper_high, dtype=like.dtype, device=like.device)
        return low, high

    def normalize_actions(self, actions: Tensor) -> Tensor:
        """Raw (..., arm + gripper) -> arm clipped to [-1, 1], gripper clipped to [0, 1]."""
        arm, grip = actions[..., : self.arm_dim], actions[..., self.arm_dim:]
        low, high = self._arm(actions)
        span = high - low
        arm_n = torch.where(span > 0, 2 * (arm - low) / span.clamp_min(1e-12) - 1, torch.zeros_like(arm))
        g_low, g_high = self._grip(actions)
        g_span = g_high - g_low
        grip_n = torch.where(g_span != 0, (grip - g_low) / torch.where(g_span != 0, g_span, 1), torch.zeros_like(grip))
        return torch.cat([arm_n.clamp(-1, 1), grip_n.clamp(0, 1)], dim=-1)

    def unnormalize_actions(self, actions: Tensor) -> Tensor:
        """Normalized (..., arm + gripper) -> raw units (the gripper value is returned continuous)."""
        arm, grip = actions[..., : self.arm_dim], actions[..., self.arm_dim:]
        low, high = self._arm(actions)
        g_low, g_high = self._grip(actions)
        return torch.cat([(arm + 1) / 2 * (high - low) + low, grip * (g_high - g_low) + g_low], dim=-1)

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> Normalizer:
        try:
            return cls(**state)
        except TypeError as e:
            raise ValueError(f"not a Normalizer state (keys {sorted(state)}): {e}") from e

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.state_dict(), indent=1))
        tmp.replace(path)  # atomic: a crash never leaves a half-written stats file

    @classmethod
    def load(cls, path: str | Path) -> Normalizer:
        try:
            return cls.from_state_dict(json.loads(Path(path).read_text()))
        except (json.JSONDecodeError, ValueError) as e:
            raise ValueError(f"{path}: not a vitavla normalizer JSON ({e})") from e
