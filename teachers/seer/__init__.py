"""Seer (Tian et al., "Predictive Inverse Dynamics Models are Scalable Learners for Robotic Manipulation"),
re-implemented so that the official checkpoints load key for key.

Modules: ``config`` (presets), ``vision`` (MAE ViT), ``perceiver``, ``gpt2``, ``mask``, ``modeling``
(``SeerModel``), ``text`` (CLIP text tower), ``checkpoint`` (loaders), ``teacher`` (``SeerTeacher``).
"""

from teachers.seer.checkpoint import (
    CheckpointMismatchError,
    export_seer_checkpoint,
    load_mae_checkpoint,
    load_seer_checkpoint,
    read_state_dict,
)
from teachers.seer.config import PRESETS, RELEASED_TRAINABLE_PARAMETERS, SeerConfig
from teachers.seer.mask import seer_attention_mask
from teachers.seer.modeling import SeerModel, SeerOutput
from teachers.seer.teacher import SeerTeacher
from teachers.seer.text import CLIPTextEncoder

__all__ = [
    "PRESETS",
    "RELEASED_TRAINABLE_PARAMETERS",
    "CLIPTextEncoder",
    "CheckpointMismatchError",
    "SeerConfig",
    "SeerModel",
    "SeerOutput",
    "SeerTeacher",
    "export_seer_checkpoint",
    "load_mae_checkpoint",
    "load_seer_checkpoint",
    "read_state_dict",
    "seer_attention_mask",
]
