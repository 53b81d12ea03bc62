"""Seer's hyper-parameters, with the three released configurations and a tiny one for CPU tests.

Values come from the official eval scripts (https://github.com/OpenRobotLab/Seer) plus the argparse
defaults they rely on. In
particular the foresight token count is 9 per camera for Seer: the ``SeerAgent`` constructor default (10) is
never used by a released run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class SeerConfig:
    name: str = "custom"
    # GPT-2 backbone
    hidden_size: int = 384
    num_layers: int = 24
    num_heads: int = 12
    dropout: float = 0.1
    """GPT-2's resid/embd/attn dropout (transformers' GPT2Config default); active in train mode only."""
    # Token layout
    sequence_length: int = 10
    """History length S: rows of the per-timestep position embedding."""
    num_resampler_queries: int = 6
    """Nq: perceiver latents per camera."""
    num_obs_tokens_per_image: int = 9
    """No: foresight queries per camera; a perfect square (the decoder lays them on a sqrt(No) grid)."""
    action_pred_steps: int = 3
    # Robot state and action
    arm_dim: int = 6
    """Arm values in the state and the action: 6 for Seer's end-effector pose, 12 for a bimanual ALOHA
    (2 arms x 6 joints). Sets ``arm_state_encoder``'s input and ``arm_action_decoder``'s output."""
    gripper_dim: int = 1
    """Grippers, i.e. gripper action outputs (one sigmoid each): 1 in every released Seer, 2 for a bimanual
    robot. Sets ``gripper_action_decoder``'s output width."""
    gripper_width: bool = False
    """False: one binary value per gripper thresholded into a one-hot (CALVIN); True: raw gripper positions
    (LIBERO: 2 finger positions; ALOHA: 1 opening width per gripper)."""
    gripper_state_dim: int | None = None
    """Gripper values in the raw state. None: ``gripper_dim`` for binary grippers, ``2 * gripper_dim`` finger
    positions for ``gripper_width`` (LIBERO). Set it for width robots that record another count, e.g. 2 for
    ALOHA's two opening widths (``gripper_dim`` 2). ``gripper_state_encoder`` reads ``gripper_features``."""
    # Frozen MAE ViT encoder
    image_size: int = 224
    patch_size: int = 16
    vit_dim: int = 768
    vit_depth: int = 12
    vit_heads: int = 12
    vit_mlp_ratio: float = 4.0
    # Perceiver resampler (open_flamingo defaults as Seer uses them)
    resampler_depth: int = 3
    resampler_heads: int = 8
    resampler_dim_head: int = 64
    resampler_ff_mult: int = 4
    # Foresight image decoder
    image_decoder_depth: int = 2
    image_decoder_heads: int = 16
    # Text features (CLIP ViT-B/32 text tower output width)
    text_dim: int = 512

    def __post_init__(self) -> None:
        for name in ("arm_dim", "gripper_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"SeerConfig.{name} must be >= 1, got {getattr(self, name)}")
        self._check_gripper_state_dim()
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % self.image_decoder_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by image_decoder_heads "
                             f"{self.image_decoder_heads}")
        if math.isqrt(self.num_obs_tokens_per_image) ** 2 != self.num_obs_tokens_per_image:
            raise ValueError("num_obs_tokens_per_image must be a perfect square, got "
                             f"{self.num_obs_tokens_per_image}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}")

    def _check_gripper_state_dim(self) -> None:
        n, g = self.gripper_state_dim, self.gripper_dim
        if n is None:
            return
        if not self.gripper_width and n != g:
            # The one-hot rule reads exactly one open/closed value per gripper.
            raise ValueError(f"SeerConfig.gripper_state_dim={n} does not fit binary grippers: they have one "
                             f"value each, so it must be gripper_dim={g} or None (or set gripper_width=True)")
        if self.gripper_width and (n < 1 or n % g):
            raise ValueError(f"SeerConfig.gripper_state_dim={n} must be a positive multiple of "
                             f"gripper_dim={g} (the same number of width values per gripper)")

    # Token layout within one step, as Seer's model builds it: group A = text, state, Nq primary, Nq wrist,
    # 2 CLS; group B = No primary foresight, No wrist foresight, P action queries.
    @property
    def num_a_tokens(self) -> int:
        return 2 + 2 * self.num_resampler_queries + 2

    @property
    def num_b_tokens(self) -> int:
        return 2 * self.num_obs_tokens_per_image + self.action_pred_steps

    @property
    def tokens_per_step(self) -> int:
        return self.num_a_tokens + self.num_b_tokens

    @property
    def obs_token_start(self) -> int:
        return self.num_a_tokens

    @property
    def action_token_start(self) -> int:
        return self.num_a_tokens + 2 * self.num_obs_tokens_per_image

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def gripper_state_values(self) -> int:
        """Gripper values in Seer's raw state: ``gripper_state_dim`` or its default (1 binary value or 2
        finger positions per gripper)."""
        if self.gripper_state_dim is not None:
            return self.gripper_state_dim
        return 2 * self.gripper_dim if self.gripper_width else self.gripper_dim

    @property
    def gripper_features(self) -> int:
        """Width of ``gripper_state_encoder``'s input: the one-hot doubles binary values (2 for the released
        models either way)."""
        return self.gripper_state_values if self.gripper_width else 2 * self.gripper_state_values

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def preset(cls, name: str, **overrides) -> SeerConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown Seer preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)


PRESETS: dict[str, SeerConfig] = {
    # scripts/CALVIN_ABC_D/Seer/eval.sh
    "seer_calvin": SeerConfig(name="seer_calvin"),
    # scripts/CALVIN_ABC_D/Seer-Large/eval.sh
    "seer_large_calvin": SeerConfig(
        name="seer_large_calvin", hidden_size=1024, num_heads=16, num_resampler_queries=16,
        num_obs_tokens_per_image=16,
    ),
    # scripts/LIBERO_LONG/Seer/eval.sh (--gripper_width, sequence_length 7)
    "seer_libero": SeerConfig(name="seer_libero", sequence_length=7, gripper_width=True),
    # Same wiring at toy sizes: fast CPU tests and smoke runs, never a released model.
    "tiny": SeerConfig(
        name="tiny", hidden_size=32, num_layers=2, num_heads=2, sequence_length=10,
        num_resampler_queries=2, num_obs_tokens_per_image=4, patch_size=32, vit_dim=64, vit_depth=2,
        vit_heads=2, resampler_depth=1, resampler_heads=2, resampler_dim_head=16, image_decoder_depth=1,
        image_decoder_heads=2, text_dim=64,
    ),
}

# Trainable parameters of each released checkpoint (counted on the official model code): everything
# except the frozen MAE ViT and CLIP and the fixed image-decoder position embedding.
RELEASED_TRAINABLE_PARAMETERS = {
    "seer_calvin": 67_689_614,
    "seer_large_calvin": 357_767_950,
    "seer_libero": 67_688_462,
}
