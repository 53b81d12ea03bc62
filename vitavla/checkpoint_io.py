"""Reading weights safely, and one clear error when they do not fit.

Every weight file in vitavla goes through :func:`read_state_dict`: safetensors, or ``torch.load`` with
``weights_only=True`` (no unpickling of code), or a DeepSpeed checkpoint directory. Every fit check goes
through :func:`check_fit`, which lists all missing keys, unexpected keys and shape mismatches at once.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import Tensor, nn

CONTAINER_KEYS = ("state_dict", "model_state_dict", "model")
"""Where training loops nest their weights: Lightning, Seer's loops, MAE / timm files."""
MAX_LISTED = 25


class CheckpointMismatchError(ValueError):
    """Weights that do not fit a module: the message names every missing, unexpected and mis-shaped key."""


def read_state_dict(path: str | Path, containers: tuple[str, ...] = CONTAINER_KEYS) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file, a torch file (flat or nested under one of ``containers``), or a
    DeepSpeed checkpoint directory. Other entries of a torch file (optimizer state, epoch) are ignored."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        return _read_deepspeed_dir(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(
            f"{path} cannot be read with torch.load(weights_only=True): {err}. TorchScript archives (such as "
            "OpenAI's ViT-B-32.pt), truncated files and checkpoints that pickle Python objects are refused; "
            "convert the weights to a plain state dict or a .safetensors file.") from err
    if isinstance(obj, dict):
        for key in containers:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path} holds no state dict of tensors (looked for a flat dict or one under "
                         f"{list(containers)}; found {keys})")
    return obj


def _read_deepspeed_dir(path: Path) -> dict[str, Tensor]:
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as e:
        raise ValueError(f"{path} is a directory (a DeepSpeed checkpoint?); install the 'deepspeed' extra "
                         f"to read it") from e
    sd = get_fp32_state_dict_from_zero_checkpoint(str(path))
    return {k.removeprefix("_forward_module."): v for k, v in sd.items()}


def check_fit(state: dict[str, Tensor], expected: dict[str, torch.Size | tuple], source: str | Path,
              what: str, notes: list[str] = ()) -> None:
    """Raise one :class:`CheckpointMismatchError` listing every way ``state`` differs from ``expected``."""
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = sorted(f"{k}: expected {tuple(expected[k])}, found {tuple(state[k].shape)}"
                        for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k]))
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{source} does not fit {what}:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched)):
        if items:
            more = f", ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
            lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:MAX_LISTED]) + more)
    lines.extend(f"  {n}" for n in notes)
    raise CheckpointMismatchError("\n".join(lines))


def load_strict(module: nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    """Load ``state_dict`` into ``module`` after :func:`check_fit` against the module's own keys."""
    check_fit(state_dict, {k: v.shape for k, v in module.state_dict().items()}, source, type(module).__name__)
    module.load_state_dict(state_dict, strict=True)


def select_prefix(state_dict: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries under ``prefix`` (e.g. ``"mapper."``), with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
