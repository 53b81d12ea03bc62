"""``SeerTeacher``: Seer behind the :class:`~teachers.base.Teacher` contract, built from plain YAML values."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from teachers.base import ActionHead, Teacher
from teachers.seer.checkpoint import load_mae_checkpoint, load_seer_checkpoint
from teachers.seer.config import SeerConfig
from teachers.seer.modeling import SeerModel, SeerOutput
from teachers.seer.text import CLIPTextEncoder
from vitavla.batch import RobotSpec, Window

# CLIP's image normalisation (Seer uses CLIP's transform for both cameras, not ImageNet statistics).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEST_PRESETS = ("tiny",)


class SeerTeacher(Teacher):
    """Seer (Tian et al., ICLR 2025) as a distillation teacher.

    Args:
        preset: ``seer_calvin``, ``seer_large_calvin``, ``seer_libero`` or ``tiny`` (a random toy model for
            tests).
        checkpoint: official finetune checkpoint (``{'model_state_dict': {'module.…'}}`` ``.pth``, or a
            ``.safetensors`` file with the same keys). Without it the weights stay random (a warning says so
            for the released presets).
        vit_checkpoint: MAE ViT-B/16 encoder file (``mae_pretrain_vit_base.pth``); required by the released
            presets.
        clip_text: local HF-format CLIP directory for the text tower; required by released presets, the tiny
            preset builds a small random one when it is None.
        allow_history_truncation: accept a checkpoint with a longer history (a pretrain one) and keep the
            first rows of its position embedding.
        overrides: SeerConfig fields to change on top of the preset (e.g. ``{"sequence_length": 7}``).
        seed: seed of the random initialisation (weights that no file provides, the tiny text tower).
        text_cache_size: distinct instructions whose text features are kept.
    """

    def __init__(self, preset: str = "seer_calvin", checkpoint: str | None = None,
                 vit_checkpoint: str | None = None, clip_text: str | None = None,
                 allow_history_truncation: bool = False, overrides: dict[str, Any] | None = None,
                 seed: int = 0, text_cache_size: int = 4096):
        super().__init__()
        cfg = SeerConfig.preset(preset, **(overrides or {}))
        released = preset not in TEST_PRESETS
        if released and vit_checkpoint is None:
            raise ValueError(f"Seer preset {preset} needs vit_checkpoint: the MAE ViT-B/16 encoder file "
                             "(mae_pretrain_vit_base.pth, {'model': {...}}), which Seer's checkpoints do not "
                             "contain.")
        if released and clip_text is None:
            raise ValueError(f"Seer preset {preset} needs clip_text: a local HF-format CLIP ViT-B/32 "
                             "directory (e.g. a copy of openai/clip-vit-base-patch32) for the instruction "
                             "encoder.")
        self.cfg = cfg
        self.preset = preset
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = SeerModel(cfg)
        if vit_checkpoint is not None:
            load_mae_checkpoint(self.model.vision_encoder, vit_checkpoint)
        if checkpoint is not None:
            load_seer_checkpoint(self.model, checkpoint, allow_history_truncation)
        elif released:
            warnings.warn(f"SeerTeacher({preset}) has no checkpoint: its GPT-2, resampler and heads are "
                          "random", stacklevel=2)
        if clip_text is None:
            self.text_encoder = CLIPTextEncoder.tiny(cfg.text_dim, seed=seed, cache_size=text_cache_size)
        else:
            self.text_encoder = CLIPTextEncoder.from_pretrained(clip_text, cache_size=text_cache_size)
        if self.text_encoder.dim != cfg.text_dim:
            raise ValueError(f"the CLIP text tower gives {self.text_encoder.dim}-D features but Seer preset "
                             f"{preset} projects {cfg.text_dim}-D ones")

        self.hidden_size = cfg.hidden_size
        self.num_action_queries = cfg.action_pred_steps
        self.max_steps = cfg.sequence_length
        self.image_size = cfg.image_size
        if cfg.gripper_width:
            self.robot = RobotSpec(arm_dim=cfg.arm_dim, gripper_dim=1, gripper_state="width",
                                   gripper_state_dim=2)
        else:
            self.robot = RobotSpec(arm_dim=cfg.arm_dim, gripper_dim=1, gripper_state="binary")
        self.register_buffer("clip_mean", torch.tensor(CLIP_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(CLIP_STD).view(3, 1, 1), persistent=False)

    @property
    def action_head(self) -> ActionHead:
        """Seer's pretrained decoder (the same parameters as ``model.action_decoder`` etc.)."""
        return self.model.action_head

    def normalize_images(self, images: Tensor) -> Tensor:
        """uint8 (..., 3, H, W) -> float CLIP-normalised, on the model's device and dtype."""
        ref = self.model.transformer_backbone_position_embedding
        x = images.to(ref.device, non_blocking=True).to(ref.dtype) / 255.0
        return (x - self.clip_mean.to(ref.dtype)) / self.clip_std.to(ref.dtype)

    def forward(self, window: Window, predict_images: bool = False) -> SeerOutput:
        """Every Seer output for a window (T <= S steps); step t depends on steps <= t only."""
        window = self.check_window(window)
        ref = self.model.transformer_backbone_position_embedding
        images = self.normalize_images(window.images)
        arm, grip = self.robot.split_state(window.state.to(ref.device, ref.dtype))
        b, t = window.state.shape[:2]
        text = self.text_encoder(window.instruction).to(ref.dtype)
        return self.model.forward_features(images[:, :, 0], images[:, :, 1], arm, grip,
                                           text[:, None].expand(b, t, -1), predict_images)

    def encode(self, window: Window) -> Tensor:
        return self.forward(window).action_query_hidden

    def extra_repr(self) -> str:
        return f"preset={self.preset}, hidden_size={self.hidden_size}, max_steps={self.max_steps}"
