"""``SeerTeacher``: Seer behind the :class:`~teachers.base.Teacher` contract, built from plain YAML values."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from teachers.base import ActionHead, Teacher
from teachers.seer.checkpoint import (
    CheckpointMismatchError,
    fingerprint,
    load_mae_checkpoint,
    load_seer_checkpoint,
    read_export_metadata,
    write_seer_export,
)
from teachers.seer.config import SeerConfig
from teachers.seer.modeling import SeerModel, SeerOutput
from teachers.seer.text import CLIPTextEncoder
from teachers.seer.training import SeerObjective, seer_training_loss
from vitavla.batch import RobotSpec, Window
from vitavla.images import normalize_images

# CLIP's image normalisation (Seer uses CLIP's transform for both cameras, not ImageNet statistics).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEST_PRESETS = ("tiny",)
# Training-only settings: a teacher trained with other values gives the same outputs in eval mode.
_CONFIG_FIELDS_NOT_CHECKED = ("name", "dropout")


def robot_spec(cfg: SeerConfig) -> RobotSpec:
    """The robot a Seer config reads and predicts, in the data's terms (what ``setup()`` compares)."""
    if cfg.gripper_width:
        return RobotSpec(arm_dim=cfg.arm_dim, gripper_dim=cfg.gripper_dim, gripper_state="width",
                         gripper_state_dim=cfg.gripper_state_values, action_chunk=cfg.action_pred_steps)
    # Binary grippers always have one state value each: RobotSpec's default, left implicit so that the spec
    # equals the datamodules' (e.g. CALVIN's RobotSpec()).
    return RobotSpec(arm_dim=cfg.arm_dim, gripper_dim=cfg.gripper_dim, gripper_state="binary",
                     action_chunk=cfg.action_pred_steps)


class SeerTeacher(Teacher):
    """Seer (Tian et al., ICLR 2025) as a distillation teacher, and trainable with Seer's own objective.

    Built without :meth:`freeze` it trains (``vitavla.modules.TeacherModule``): everything but the MAE ViT, the
    CLIP text tower and the fixed image-decoder position embedding, which stay frozen as in Seer.

    Args:
        preset: ``seer_calvin``, ``seer_large_calvin``, ``seer_libero`` or ``tiny`` (a random toy model for
            tests).
        checkpoint: official finetune checkpoint (``{'model_state_dict': {'module.…'}}`` ``.pth``, or a
            ``.safetensors`` file with the same keys), or one written by :meth:`export` after training with
            ``TeacherModule``. Without it the weights stay random (a warning says so for the released presets).
            An exported file records the config and a fingerprint of the frozen ViT and text tower it was
            trained with; loading it with different ones (for ``tiny``: another seed or overrides) is an error.
        vit_checkpoint: MAE ViT-B/16 encoder file (``mae_pretrain_vit_base.pth``); required by the released
            presets.
        clip_text: local HF-format CLIP directory for the text tower; required by released presets, the tiny
            preset builds a small random one when it is None.
        allow_history_truncation: accept a checkpoint with a longer history (a pretrain one) and keep the
            first rows of its position embedding.
        overrides: SeerConfig fields to change on top of the preset (e.g. ``{"sequence_length": 7}``, or
            ``{"arm_dim": 12, "gripper_dim": 2, "gripper_width": True, "gripper_state_dim": 2}`` for a
            bimanual ALOHA; no released checkpoint fits that robot, so it trains from scratch).
        seed: seed of the random initialisation (weights that no file provides, the tiny text tower).
        text_cache_size: distinct instructions whose text features are kept.
        objective: weights and augmentation of :meth:`training_loss` (default: Seer's released values, e.g.
            ``gripper_weight`` 0.01); only training reads it, so a teacher loads the same either way.
        init: ``pretrained`` reads the files above; ``random`` reads none and builds the architecture with
            random weights (the text tower at CLIP ViT-B/32's shape when ``clip_text`` is set), for memory
            planning on the meta device (``vitavla plan``) where the checkpoints need not exist.
    """

    def __init__(self, preset: str = "seer_calvin", checkpoint: str | None = None,
                 vit_checkpoint: str | None = None, clip_text: str | None = None,
                 allow_history_truncation: bool = False, overrides: dict[str, Any] | None = None,
                 seed: int = 0, text_cache_size: int = 4096, objective: SeerObjective | None = None,
                 init: str = "pretrained"):
        super().__init__()
        if init not in ("pretrained", "random"):
            raise ValueError(f"SeerTeacher.init must be 'pretrained' or 'random', got {init!r}")
        cfg = SeerConfig.preset(preset, **(overrides or {}))
        released = preset not in TEST_PRESETS
        if init == "random":
            # Shapes only: the files would fill in weights, never change a shape.
            checkpoint = None
            vit_checkpoint = None
            text_shape = "clip_b32" if clip_text is not None else "tiny"
            clip_text = None
        if init == "pretrained" and released and vit_checkpoint is None:
            raise ValueError(f"Seer preset {preset} needs vit_checkpoint: the MAE ViT-B/16 encoder file "
                             "(mae_pretrain_vit_base.pth, {'model': {...}}), which Seer's checkpoints do not "
                             "contain.")
        if init == "pretrained" and released and clip_text is None:
            raise ValueError(f"Seer preset {preset} needs clip_text: a local HF-format CLIP ViT-B/32 "
                             "directory (e.g. a copy of openai/clip-vit-base-patch32) for the instruction "
                             "encoder.")
        self.cfg = cfg
        self.preset = preset
        self.seed = seed
        self.overrides = dict(overrides or {})
        self.vit_checkpoint, self.clip_text = vit_checkpoint, clip_text
        self.objective = objective if objective is not None else SeerObjective()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = SeerModel(cfg)
        if vit_checkpoint is not None:
            load_mae_checkpoint(self.model.vision_encoder, vit_checkpoint)
        if checkpoint is not None:
            load_seer_checkpoint(self.model, checkpoint, allow_history_truncation)
        elif released and init == "pretrained":
            warnings.warn(f"SeerTeacher({preset}) has no checkpoint: its GPT-2, resampler and heads are "
                          "random", stacklevel=2)
        if init == "random" and text_shape == "clip_b32":
            self.text_encoder = CLIPTextEncoder.clip_b32_shape(cfg.text_dim, seed=seed, cache_size=text_cache_size)
        elif clip_text is None:
            self.text_encoder = CLIPTextEncoder.tiny(cfg.text_dim, seed=seed, cache_size=text_cache_size)
        else:
            self.text_encoder = CLIPTextEncoder.from_pretrained(clip_text, cache_size=text_cache_size)
        if self.text_encoder.dim != cfg.text_dim:
            raise ValueError(f"the CLIP text tower gives {self.text_encoder.dim}-D features but Seer preset "
                             f"{preset} projects {cfg.text_dim}-D ones")
        if checkpoint is not None:
            self._check_export_provenance(checkpoint, allow_history_truncation)

        self.hidden_size = cfg.hidden_size
        self.num_action_queries = cfg.action_pred_steps
        self.max_steps = cfg.sequence_length
        self.image_size = cfg.image_size
        self.robot = robot_spec(cfg)

    @property
    def action_head(self) -> ActionHead:
        """Seer's pretrained decoder (the same parameters as ``model.action_decoder`` etc.)."""
        return self.model.action_head

    def normalize_images(self, images: Tensor) -> Tensor:
        """uint8 (..., 3, H, W) -> float CLIP-normalised, on the model's device and dtype."""
        ref = self.model.transformer_backbone_position_embedding
        return normalize_images(images.to(ref.device, non_blocking=True), CLIP_MEAN, CLIP_STD, ref.dtype)

    def forward(self, window: Window, predict_images: bool = False) -> SeerOutput:
        """Every Seer output for a window (T <= S steps); step t depends on steps <= t only."""
        window = self.check_window(window)
        return self.run(window, self.normalize_images(window.images), predict_images)

    def run(self, window: Window, images: Tensor, predict_images: bool = False) -> SeerOutput:
        """Seer on a checked window whose images are already normalised (B, T, 2, 3, H, W) floats, e.g.
        augmented ones in training."""
        ref = self.model.transformer_backbone_position_embedding
        arm, grip = self.robot.split_state(window.state.to(ref.device, ref.dtype))
        b, t = window.state.shape[:2]
        text = self.text_encoder(window.instruction).to(ref.dtype)
        return self.model.forward_features(images[:, :, 0], images[:, :, 1], arm, grip,
                                           text[:, None].expand(b, t, -1), predict_images)

    def encode(self, window: Window) -> Tensor:
        return self.forward(window).action_query_hidden

    def training_loss(self, window: Window) -> tuple[Tensor, dict[str, Tensor]]:
        """Seer's objective: smooth-L1(arm) + 0.01 * BCE(gripper) + 0.1 * foresight MSE, random shifts in
        training mode (see :mod:`teachers.seer.training`). Parts: ``arm``, ``gripper``, ``image``."""
        return seer_training_loss(self, window, self.objective)

    def provenance(self) -> dict[str, str]:
        """What a checkpoint of this teacher depends on beyond its own weights, as export metadata."""
        return {
            "seer_config": json.dumps(self.cfg.to_dict(), sort_keys=True),
            "preset": self.preset,
            "overrides": json.dumps(self.overrides, sort_keys=True),
            "seed": str(self.seed),
            "vit_checkpoint": str(self.vit_checkpoint),
            "clip_text": str(self.clip_text),
            "vision_encoder_sha256": fingerprint(self.model.vision_encoder),
            "text_encoder_sha256": fingerprint(self.text_encoder.model),
        }

    def export(self, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
        """Write the weights in Seer's official layout (``.safetensors`` or ``.pth``) for ``checkpoint=``,
        with :meth:`provenance` (plus ``metadata``) so that a load with other frozen parts fails."""
        return write_seer_export(self.model, path, {**(metadata or {}), **self.provenance()})

    def _check_export_provenance(self, path: str | Path, allow_history_truncation: bool) -> None:
        meta = read_export_metadata(path)
        if meta is None:  # an official checkpoint: nothing recorded to compare
            return
        problems = []
        saved = json.loads(meta.get("seer_config", "{}"))
        skip = set(_CONFIG_FIELDS_NOT_CHECKED) | ({"sequence_length"} if allow_history_truncation else set())
        mine = self.cfg.to_dict()
        diff = [f"{k}={saved[k]!r} (here {mine.get(k)!r})" for k in sorted(saved)
                if k not in skip and saved[k] != mine.get(k)]
        if diff:
            problems.append("Seer config differs: " + ", ".join(diff))
        for part, module, source in (("vision_encoder", self.model.vision_encoder, "vit_checkpoint"),
                                     ("text_encoder", self.text_encoder.model, "clip_text")):
            want = meta.get(f"{part}_sha256")
            if want is not None and want != fingerprint(module):
                problems.append(f"the frozen {part} differs from the one it was trained with (trained with "
                                f"{source}={meta.get(source)}, here {getattr(self, source)})")
        if problems:
            trained = (f"preset={meta.get('preset')}, overrides={meta.get('overrides')}, seed={meta.get('seed')}")
            here = f"preset={self.preset}, overrides={json.dumps(self.overrides, sort_keys=True)}, seed={self.seed}"
            hint = (" The tiny preset's ViT and text tower are random from `seed`: load with the same preset, "
                    "overrides and seed as training." if self.preset in TEST_PRESETS else
                    " Pass the vit_checkpoint and clip_text used for training.")
            raise CheckpointMismatchError(
                f"{path} was trained as SeerTeacher({trained}) and does not fit SeerTeacher({here}): "
                + "; ".join(problems) + "." + hint)

    def extra_repr(self) -> str:
        return f"preset={self.preset}, hidden_size={self.hidden_size}, max_steps={self.max_steps}"
