"""Reading and writing weights safely, and one clear error when they do not fit.

Every weight file in vitavla goes through :func:`read_state_dict`: safetensors, or ``torch.load`` with
``weights_only=True`` (no unpickling of code), or a DeepSpeed checkpoint directory (its ZeRO shards read
weights-only as well, by :mod:`vitavla.deepspeed_ckpt`). Every fit check goes
through :func:`check_fit`, which lists all missing keys, unexpected keys and shape mismatches at once.
Lightning checkpoints are written and read by :class:`AtomicCheckpointIO` (the CLI's default): a save
replaces the old file only once the new one is complete on disk, and a file that cannot be read is named.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from functools import cache
from pathlib import Path

import torch
from torch import Tensor, nn

from vitavla.errors import UserFacingError

CONTAINER_KEYS = ("state_dict", "model_state_dict", "model")
"""Where training loops nest their weights: Lightning, Seer's loops, MAE / timm files."""
MAX_LISTED = 25


class CheckpointMismatchError(UserFacingError, ValueError):
    """Weights that do not fit a module: the message names every missing, unexpected and mis-shaped key."""


class CheckpointReadError(UserFacingError, ValueError):
    """A weight or checkpoint file that ``torch.load`` cannot read (truncated, or pickling objects)."""


class CheckpointSaveError(UserFacingError, OSError):
    """A checkpoint save that failed (e.g. a full disk); the previous file at that path is unchanged."""


# What torch.load raises for a truncated or foreign file: a cut zip archive is RuntimeError ("failed finding
# central directory") or OSError (EINVAL), a cut legacy pickle EOFError, a pickled object UnpicklingError.
UNREADABLE = (pickle.UnpicklingError, RuntimeError, EOFError, OSError)


def torch_load(path: str | Path, hint: str, map_location=None):
    """``torch.load(path, weights_only=True)``; a file it cannot read raises :class:`CheckpointReadError`
    naming it. Always weights-only: a checkpoint never runs code, whatever a caller (or Lightning) asks."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except UNREADABLE as err:
        raise read_error(path, err, hint, True) from err


def read_error(path: str | Path, err: BaseException, hint: str, weights_only: bool | None = None
               ) -> CheckpointReadError:
    """The one error for a file that ``torch.load`` failed on with ``err``: names the file, then ``hint``."""
    # torch's own text can run to paragraphs (weights_only refusals); its first line says what failed.
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    how = "" if weights_only is None else f"weights_only={weights_only}"
    return CheckpointReadError(f"{path} cannot be read with torch.load({how}): {first}. {hint}")


def missing_checkpoint(path: str | Path, what: str = "checkpoint") -> FileNotFoundError:
    """The error for a checkpoint path that is not there. A path spelt ``None`` gets the likely cause: on the
    command line jsonargparse hands ``null`` for an argument of a nested class (``--model.init_args.teacher.
    init_args.checkpoint=null``) to the class as the string ``'None'``; in a YAML config ``null`` arrives as
    None."""
    hint = ""
    if str(path) == "None":
        hint = (" (a command-line 'null' for a nested class's argument arrives as the string 'None'; to load no "
                "checkpoint, write `checkpoint: null` in a YAML config passed with --config, or leave the key "
                "out)")
    return FileNotFoundError(f"{what} not found: {path}{hint}")


def read_state_dict(path: str | Path, containers: tuple[str, ...] = CONTAINER_KEYS) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file, a torch file (flat or nested under one of ``containers``), or a
    DeepSpeed checkpoint directory. Other entries of a torch file (optimizer state, epoch) are ignored."""
    path = Path(path)
    if not path.exists():
        raise missing_checkpoint(path)
    if path.is_dir():
        return _read_deepspeed_dir(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    obj = torch_load(path, "TorchScript archives (such as OpenAI's ViT-B-32.pt), truncated files and "
                     "checkpoints that pickle Python objects are refused; convert the weights to a plain state "
                     "dict or a .safetensors file.", map_location="cpu")
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
    # Our own weights-only reader: DeepSpeed's zero_to_fp32 unpickles with weights_only=False.
    from vitavla.deepspeed_ckpt import read_zero_checkpoint

    return read_zero_checkpoint(path)[0]


def check_fit(state: dict[str, Tensor], expected: dict[str, torch.Size | tuple], source: str | Path,
              what: str, notes: list[str] = (), max_listed: int = MAX_LISTED) -> None:
    """Raise one :class:`CheckpointMismatchError` listing how ``state`` differs from ``expected``: up to
    ``max_listed`` keys of each kind, then their count."""
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
            more = f", ... and {len(items) - max_listed} more" if len(items) > max_listed else ""
            lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:max_listed]) + more)
    lines.extend(f"  {n}" for n in notes)
    raise CheckpointMismatchError("\n".join(lines))


def load_strict(module: nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    """Load ``state_dict`` into ``module`` after :func:`check_fit` against the module's own keys."""
    check_fit(state_dict, {k: v.shape for k, v in module.state_dict().items()}, source, type(module).__name__)
    module.load_state_dict(state_dict, strict=True)


def select_prefix(state_dict: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries under ``prefix`` (e.g. ``"mapper."``), with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def atomic_save(obj, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` so that ``path`` always holds a complete file: the old one or the new.

    The bytes go to a temporary file in the same directory (same filesystem, so the rename is atomic),
    which is fsync'd and then renamed over ``path``; the directory is fsync'd so the rename survives a power
    loss. A kill leaves at most a ``.<name>.*.tmp`` file next to the old checkpoint; a failed write (a full
    disk) removes it and raises :class:`CheckpointSaveError` saying that the old file is unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if not isinstance(err, OSError):
            raise
        kept = f"the previous {path.name} is unchanged" if path.exists() else "no file was written"
        error = CheckpointSaveError(f"could not save checkpoint {path}: {err.strerror or err}; {kept}")
        error.errno = err.errno
        raise error from err
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # platforms without directory handles (Windows): the rename is all we can do
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


LIGHTNING_CKPT_HINT = "Is it truncated (an interrupted copy or save), or not a Lightning checkpoint?"


def __getattr__(name: str):
    # PEP 562: the Lightning plugin is built on first use, so that importing this module (teachers and
    # simulator workers do) does not import Lightning, which takes seconds.
    if name == "AtomicCheckpointIO":
        return _atomic_checkpoint_io()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@cache
def _atomic_checkpoint_io() -> type:
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
    from lightning.fabric.utilities.cloud_io import get_filesystem
    from fsspec.implementations.local import LocalFileSystem

    class AtomicCheckpointIO(TorchCheckpointIO):
        """Lightning's ``TorchCheckpointIO`` with :func:`atomic_save` for local files, and one clear error
        naming the file when a checkpoint cannot be read. The ``vitavla`` CLI installs it unless a config
        names another ``CheckpointIO`` plugin. Remote paths (``s3://``...) keep Lightning's behaviour."""

        def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
            if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
                return super().save_checkpoint(checkpoint, path, storage_options)
            atomic_save(checkpoint, path)

        def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None):
            if not isinstance(get_filesystem(path), LocalFileSystem):
                return super().load_checkpoint(path, map_location, weights_only)
            if not Path(path).exists():
                raise FileNotFoundError(f"Checkpoint file not found: {path}")
            # weights_only is ignored on purpose: our checkpoints hold tensors and plain containers only.
            return torch_load(path, LIGHTNING_CKPT_HINT, map_location=map_location)

    AtomicCheckpointIO.__module__ = __name__
    return AtomicCheckpointIO
