"""Full fp32 weights of a DeepSpeed ZeRO checkpoint directory, read with ``torch.load(weights_only=True)``.

DeepSpeed's own ``zero_to_fp32`` unpickles every shard with ``weights_only=False`` (arbitrary code) and needs
DeepSpeed installed. This reader needs neither: it reassembles the same tensors from the same files.

Layout (what Lightning's DeepSpeed strategy writes for ``last.ckpt``)::

    last.ckpt/latest                                   the tag of the newest save ("checkpoint")
    last.ckpt/<tag>/mp_rank_00_model_states.pt         ZeRO 1/2: buffers, parameter names and shapes, frozen
                                                       parameters, Lightning's client state (normalizer, ...)
    last.ckpt/<tag>/zero_pp_rank_R_mp_rank_00_model_states.pt   ZeRO 3: one per rank, frozen fragments
    last.ckpt/<tag>/*zero_pp_rank_R_mp_rank_00_optim_states.pt  one per rank: that rank's slice of the fp32
                                                       master weights (and Adam moments, not read)

The optimizer shards pickle a few DeepSpeed objects besides tensors (the loss scaler, the ZeRO stage enum,
fragment addresses). :data:`INERT_GLOBALS` lets ``weights_only`` rebuild exactly those names as inert
stand-ins (no DeepSpeed import, no code run); any other object in a shard is refused, naming it.
"""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path

import torch
from torch import Tensor

from vitavla.errors import UserFacingError


class DeepSpeedCheckpointError(UserFacingError, ValueError):
    """A DeepSpeed checkpoint that cannot be read; the message names the file and what was expected."""


class _Inert:
    """Stand-in for a DeepSpeed object in a shard: its attributes land in ``__dict__``, nothing runs."""


INERT_GLOBALS = [
    (_Inert, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_Inert, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    (_Inert, "deepspeed.utils.tensor_fragment.fragment_address"),
    (int, "deepspeed.runtime.zero.config.ZeroStageEnum"),  # an IntEnum: rebuilt as its int value
]
# The keys DeepSpeed itself puts in a model-states file; everything else is the client state (Lightning's).
_DS_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
            "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd",
            "sparse_tensor_module_names",
            "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size",
            "checkpoint_parallel_dimensions", "ds_config", "ds_version"}
LIGHTNING_PREFIX = "_forward_module."
_Error = DeepSpeedCheckpointError


def _natural(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _load(path: Path) -> dict:
    try:
        with torch.serialization.safe_globals(INERT_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        why = (f"it pickles {found.group(1)}, which is not a tensor or one of the DeepSpeed objects this "
               "reader knows" if found else (str(e).strip().splitlines() or [type(e).__name__])[0])
        raise _Error(f"{path} cannot be read with torch.load(weights_only=True): {why}") from e
    if not isinstance(obj, dict):
        raise _Error(f"{path} holds a {type(obj).__name__}, expected a DeepSpeed state dict")
    return obj


def find_tag_dir(path: str | Path) -> Path:
    """The folder holding the shards: ``path/<contents of path/latest>``, or ``path`` itself when it holds
    ``*_model_states.pt`` (a tag folder given directly)."""
    path = Path(path)
    if any(path.glob("*_model_states.pt")):
        return path
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if tag and (path / tag).is_dir():
            return path / tag
        raise _Error(f"{latest} names the tag {tag!r}, but {path / tag} is not a folder")
    raise _Error(f"{path} is not a DeepSpeed checkpoint: expected a 'latest' file naming a "
                 "tag folder with *_model_states.pt and *_optim_states.pt (as Lightning's "
                 "DeepSpeed strategy writes for a .ckpt path)")


def checkpoint_files(path: str | Path) -> list[Path]:
    """The files :func:`read_zero_checkpoint` reads (model states, then optimizer shards), in rank order."""
    tag = find_tag_dir(path)
    return (sorted(tag.glob("*_model_states.pt"), key=_natural)
            + sorted(tag.glob("*_optim_states.pt"), key=_natural))


def _flat_slice(groups: list[Tensor], offsets: list[int], start: int, length: int) -> Tensor:
    """``length`` values from ``start`` of the concatenation of ``groups`` (without concatenating them)."""
    parts = []
    for g, lo in zip(groups, offsets):
        hi = lo + g.numel()
        if hi > start and lo < start + length:
            a, b = max(start, lo) - lo, min(start + length, hi) - lo
            parts.append(g.reshape(-1)[a:b])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def read_zero_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """``(state dict, client state)`` of a DeepSpeed checkpoint: trainable parameters as their fp32 master
    weights, frozen parameters and buffers as saved, shared parameters restored, Lightning's
    ``_forward_module.`` prefix removed. The client state holds what Lightning saved beside the weights
    (``normalizer``, ``epoch``, ...). ZeRO stages 1, 2 and 3, any number of ranks."""
    tag = find_tag_dir(path)
    model_files = sorted(tag.glob("*_model_states.pt"), key=_natural)
    optim_files = sorted(tag.glob("*_optim_states.pt"), key=_natural)
    models = [_load(f) for f in model_files]
    for f, m in zip(model_files, models):
        if not isinstance(m.get("module"), dict) or "param_shapes" not in m:
            raise _Error(f"{f} has no 'module' / 'param_shapes': not a DeepSpeed model-states "
                         "file")
    first = models[0]
    client = {k: v for k, v in first.items() if k not in _DS_KEYS}
    if not optim_files:
        raise _Error(f"{tag} has no *_optim_states.pt: expected one ZeRO shard per rank "
                     "(a checkpoint saved without ZeRO holds no fp32 master weights here)")
    optims = []
    for f in optim_files:
        osd = _load(f).get("optimizer_state_dict")
        if not isinstance(osd, dict) or "zero_stage" not in osd:
            raise _Error(f"{f} has no optimizer_state_dict.zero_stage: not a ZeRO shard")
        osd.pop("optimizer_state_dict", None)  # Adam moments: not needed, drop them early
        optims.append(osd)
    stage = int(optims[0]["zero_stage"])
    world = optims[0]["partition_count"]
    world = max(world) if isinstance(world, (list, tuple)) else int(world)
    if world != len(optims):
        raise _Error(f"{tag} holds {len(optims)} *_optim_states.pt shards, expected {world} (the "
                     "partition count they record): a rank's save is missing, or an older "
                     "checkpoint was partly overwritten")
    if stage == 3 and len(models) != world:
        raise _Error(f"{tag} holds {len(models)} *_model_states.pt files, expected {world} "
                     "(ZeRO-3 saves one per rank)")
    key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    flat = [o.get(key) for o in optims]
    if not all(isinstance(g, list) and all(isinstance(t, Tensor) for t in g) for g in flat):
        raise _Error(f"{optim_files[0]}: optimizer_state_dict.{key} is not a list of tensors "
                     f"(ZeRO stage {stage})")

    state: dict[str, Tensor] = {}
    buffers = set(first.get("buffer_names") or [])
    state.update({k: v for k, v in first["module"].items() if k in buffers})
    frozen = first.get("frozen_param_shapes") or {}
    for name, shape in frozen.items():
        if stage == 3:  # each rank holds an equal, padded slice
            frag = torch.cat([m["frozen_param_fragments"][name].reshape(-1) for m in models])
            state[name] = frag[:math.prod(shape)].view(shape)
        else:
            state[name] = first["frozen_param_fragments"][name]
    if stage == 3:
        _merge_zero3(state, first["param_shapes"], flat, world, optim_files[0])
    else:
        _merge_zero2(state, first["param_shapes"], flat, world, optims[0].get("param_alignment_paddings"),
                     optim_files[0])
    for alias, source in (first.get("shared_params") or {}).items():
        if source in state:
            state[alias] = state[source]
    return {k.removeprefix(LIGHTNING_PREFIX): v for k, v in state.items()}, client


def _merge_zero2(state: dict, param_shapes: list[dict], flat: list[list[Tensor]], world: int,
                 paddings: list | None, source: Path) -> None:
    """ZeRO 1/2: a group's fp32 vector is split evenly over the ranks; parameters lie in it in order, each
    followed by its alignment padding, the whole padded to a multiple of 2 x world size."""
    for g, shapes in enumerate(param_shapes):
        full = torch.cat([rank[g].reshape(-1) for rank in flat])
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            n = math.prod(shape)
            if offset + n > full.numel():
                raise _Error(f"{source}: parameter group {g} has {full.numel()} values, too few "
                             f"for {name} {tuple(shape)} at offset {offset}")
            state[name] = full[offset:offset + n].view(shape)
            offset += n + (paddings[g][i] if paddings else 0)
        align = 2 * world
        if math.ceil(offset / align) * align != math.ceil(full.numel() / align) * align:
            raise _Error(f"{source}: parameter group {g} holds {full.numel()} values but its "
                         f"parameters take {offset}: the shards do not match the shapes")


def _merge_zero3(state: dict, param_shapes: list[dict], flat: list[list[Tensor]], world: int,
                 source: Path) -> None:
    """ZeRO 3: every parameter is cut into ``world`` equal (padded) slices, one per rank; a rank's slices lie
    back to back across its flat groups, in parameter order."""
    offsets = [0]
    for t in flat[0][:-1]:
        offsets.append(offsets[-1] + t.numel())
    per_rank = sum(t.numel() for t in flat[0])
    offset = 0
    for name, shape in ((k, v) for d in param_shapes for k, v in d.items()):
        n = math.prod(shape)
        part = math.ceil(n / world)
        if offset + part > per_rank:
            raise _Error(f"{source}: a rank's shard holds {per_rank} values, too few for "
                         f"{name} {tuple(shape)} at offset {offset}")
        pieces = [_flat_slice(rank, offsets, offset, part) for rank in flat]
        state[name] = torch.cat(pieces)[:n].view(shape)
        offset += part
    if offset != per_rank:
        raise _Error(f"{source}: a rank's shard holds {per_rank} values but the parameters take "
                     f"{offset}: the shards do not match the shapes")
