"""Reading weights safely and loading them with one clear error when they do not fit."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class CheckpointMismatchError(ValueError):
    """Weights that do not fit a module: names every missing, unexpected and mis-shaped key."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a Lightning ``.ckpt``, a ``.pt``/``.pth`` dict, a ``.safetensors`` file, or a DeepSpeed
    checkpoint directory. Never unpickles code (``weights_only=True``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError as e:
            raise ValueError(f"{path} is a DeepSpeed checkpoint directory; install the 'deepspeed' extra to "
                             f"read it") from e
        sd = get_fp32_state_dict_from_zero_checkpoint(str(path))
        return {k.removeprefix("_forward_module."): v for k, v in sd.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors name internals; say what the file should be instead
        raise ValueError(f"could not read {path} as a weights-only checkpoint ({e}); expected a Lightning "
                         f".ckpt, a torch state dict or a .safetensors file") from e
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} holds no state dict of tensors (keys: {list(obj)[:8]})")
    return obj


def load_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                ignore_unexpected: tuple[str, ...] = ()) -> None:
    """Load ``state_dict`` into ``module``; raise one :class:`CheckpointMismatchError` listing every problem.

    Keys starting with a prefix in ``ignore_unexpected`` are dropped silently (known-unused keys).
    """
    own = module.state_dict()
    sd = {k: v for k, v in state_dict.items() if not k.startswith(ignore_unexpected) or k in own}
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    shapes = sorted(f"{k}: expected {tuple(own[k].shape)}, found {tuple(sd[k].shape)}"
                    for k in sd if k in own and tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or shapes:
        lines = [f"{source} does not fit {type(module).__name__}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", shapes)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        raise CheckpointMismatchError("\n".join(lines))
    module.load_state_dict(sd, strict=True)


def select_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix`` (e.g. ``"mapper."``), with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
