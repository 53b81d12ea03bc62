"""Loading Seer's two weight files: the finetune checkpoint and the MAE ViT encoder.

Files are read with ``torch.load(weights_only=True)`` (or safetensors), never by unpickling arbitrary objects.
A file that does not fit fails once, with every missing key, unexpected key and shape mismatch listed, instead
of the official ``strict=False`` load that silently leaves parameters at their random initialisation.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor, nn

from teachers.seer.config import SeerConfig
from teachers.seer.modeling import SeerModel
from teachers.seer.vision import MAEEncoder
from vitavla.checkpoint_io import CheckpointMismatchError, check_fit, read_state_dict

_POS_KEY = "transformer_backbone_position_embedding"
# Frozen or recomputed parts that a full (unfiltered) Seer state dict may contain; they never come from here.
_SEER_IGNORED_PREFIXES = ("clip_model.", "vision_encoder.")
_SEER_IGNORED_KEYS = ("attention_mask", "image_decoder_position_embedding")
# The MAE decoder, present in some MAE files and never used by Seer.
_MAE_IGNORED_PREFIXES = ("decoder_", "mask_token")
# Weights whose width the robot fields of SeerConfig set: key -> (axis of nn.Linear's (out, in) weight, what
# that axis counts, the fields that size it). A mismatch there means the file is for another robot.
_ROBOT_KEYS = {
    "arm_action_decoder.0.weight": (0, "arm outputs", ("arm_dim",)),
    "gripper_action_decoder.0.weight": (0, "gripper outputs", ("gripper_dim",)),
    "arm_state_encoder.weight": (1, "arm state inputs", ("arm_dim",)),
    "gripper_state_encoder.weight": (1, "gripper state features", ("gripper_dim", "gripper_width",
                                                                   "gripper_state_dim")),
}


def strip_prefix(state: dict[str, Tensor], prefix: str = "module.") -> dict[str, Tensor]:
    """Drop the prefix DDP adds to every key of Seer's saved model (keys without it are kept as they are)."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def load_seer_checkpoint(model: SeerModel, path: str | Path, allow_history_truncation: bool = False) -> None:
    """Load an official Seer checkpoint (``{'model_state_dict': {'module.…': …}}``) into ``model``.

    The position embedding fixes the history length. A longer one (e.g. a pretrain checkpoint with S = 14 or
    11) is cut to the first S rows only with ``allow_history_truncation``, as Seer's finetune-from-pretrain
    does; a shorter one is always an error.
    """
    cfg = model.cfg
    state = strip_prefix(read_state_dict(path))
    state = {k: v for k, v in state.items()
             if not k.startswith(_SEER_IGNORED_PREFIXES) and k not in _SEER_IGNORED_KEYS}
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith("vision_encoder.")}

    pos = state.get(_POS_KEY)
    want = expected[_POS_KEY]
    # Only a pure history-length difference gets the history message; other shape errors are listed below.
    if pos is not None and pos.dim() == 4 and pos.shape[1] != want[1] and (pos.shape[0], pos.shape[2:]) == (
        want[0], want[2:]
    ):
        found = pos.shape[1]
        if allow_history_truncation and found > want[1]:
            state[_POS_KEY] = pos[:, : want[1]].clone()
        else:
            hint = (" Pass allow_history_truncation=True to keep its first "
                    f"{want[1]} rows, as Seer's finetune-from-pretrain does." if found > want[1] else "")
            raise CheckpointMismatchError(
                f"{path}: checkpoint has history {found} but preset {cfg.name} expects {want[1]} "
                f"({_POS_KEY} is {tuple(pos.shape)}).{hint}"
            )
    check_fit(state, expected, path, f"Seer preset {cfg.name}", _robot_notes(state, expected, cfg))
    # check_fit proved the keys equal everything but the vision encoder, which comes from the MAE file.
    model.load_state_dict(state, strict=False)


def _robot_notes(state: dict[str, Tensor], expected: dict[str, torch.Size],
                 cfg: SeerConfig) -> list[str]:
    """One line per robot-sized weight whose shape differs, naming the key, both shapes and the config fields
    (the generic shape list alone does not say which override to change)."""
    notes = []
    for key, (axis, what, fields) in _ROBOT_KEYS.items():
        found, want = state.get(key), expected.get(key)
        if found is None or want is None or tuple(found.shape) == tuple(want) or found.dim() != len(want):
            continue
        config = ", ".join(f"{f}={getattr(cfg, f)!r}" for f in fields)
        notes.append(f"{key} is {tuple(found.shape)} in the checkpoint but {tuple(want)} for this config: "
                     f"the checkpoint has {found.shape[axis]} {what}, SeerConfig({config}) gives "
                     f"{want[axis]}; set these overrides to the robot the checkpoint was trained for.")
    return notes


def load_mae_checkpoint(encoder: MAEEncoder, path: str | Path) -> None:
    """Load the MAE ViT encoder file (``{'model': {…}}``, e.g. ``mae_pretrain_vit_base.pth``).

    MAE-decoder keys are ignored (Seer never runs the decoder); ``pos_embed`` is taken from the file, as the
    official code does.
    """
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(_MAE_IGNORED_PREFIXES)}
    check_fit(state, {k: v.shape for k, v in encoder.state_dict().items()}, path, "the MAE ViT encoder")
    encoder.load_state_dict(state, strict=True)


def export_seer_checkpoint(model: SeerModel) -> dict[str, dict[str, Tensor]]:
    """``model`` in the official layout, ``{'model_state_dict': {'module.…': …}}``, without the vision
    encoder (which the official files do not hold either)."""
    return {"model_state_dict": {f"module.{k}": v for k, v in model.state_dict().items()
                                 if not k.startswith("vision_encoder.")}}



EXPORT_FORMAT = "vitavla.seer_teacher.v1"
"""Marks a file written by :func:`write_seer_export`; official checkpoints carry no such metadata."""
_PTH_METADATA_KEY = "vitavla"


def fingerprint(module: nn.Module) -> str:
    """sha256 of a module's state dict (names, shapes, fp32 values): identifies frozen weights no file holds."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        value = value.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(value.shape)};".encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def write_seer_export(model: SeerModel, path: str | Path, metadata: dict[str, str]) -> Path:
    """Write ``model`` in the official layout, as ``.safetensors`` (keys ``module.…``) or ``.pth``
    (``{'model_state_dict': {'module.…'}}``), with string ``metadata`` that :func:`read_export_metadata`
    returns (safetensors header, or the ``'vitavla'`` entry of the ``.pth`` dict, which official loaders
    ignore)."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".pth", ".pt"):
        raise ValueError(f"Seer export path must end in .safetensors, .pth or .pt, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous()
             for k, v in export_seer_checkpoint(model)["model_state_dict"].items()}
    meta = {"format": "pt", "vitavla_format": EXPORT_FORMAT, **metadata}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata=meta)
    else:
        torch.save({"model_state_dict": state, _PTH_METADATA_KEY: meta}, path)
    return path


def read_export_metadata(path: str | Path) -> dict[str, str] | None:
    """The metadata :func:`write_seer_export` stored, or None for files it did not write (official ones)."""
    path = Path(path)
    if path.is_dir():
        return None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    else:
        try:
            # mmap: only the small metadata entry is read, not every tensor again.
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) torch files cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
        meta = obj.get(_PTH_METADATA_KEY, {}) if isinstance(obj, dict) else {}
    return dict(meta) if meta.get("vitavla_format") == EXPORT_FORMAT else None
