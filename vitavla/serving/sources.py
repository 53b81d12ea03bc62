"""What ``vitavla export`` reads: a training checkpoint of a stage-1 or stage-2 module, as a file or a
DeepSpeed directory, loaded into the module that the config builds, and the policy that module deploys.

Checkpoint kinds (``--ckpt_path``):

* a Lightning ``.ckpt`` file (``vitavla fit`` without DeepSpeed): the trainable parameters and the
  normalizer, read with ``torch.load(weights_only=True)``;
* a DeepSpeed checkpoint directory (Lightning's DeepSpeed strategies write ``last.ckpt/`` as one): every
  parameter reassembled from the ZeRO shards by :mod:`vitavla.deepspeed_ckpt`, also weights-only.

Modules: :class:`~vitavla.modules.PolicyModule` (stage 2) deploys its ``policy``;
:class:`~vitavla.modules.DistillationModule` (stage 1) deploys the aligned student: student -> mapper ->
the teacher's action head, the policy stage 2's ``two_stage`` mode starts from.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from torch import nn

from vitavla.errors import UserFacingError
from vitavla.policy import VLAPolicy


class CheckpointSourceError(UserFacingError, ValueError):
    """A ``--ckpt_path`` that is not a checkpoint this exporter reads; the message names it."""


def checkpoint_kind(path: str | Path) -> str:
    """``"lightning"`` (a file) or ``"deepspeed"`` (a directory); anything else raises, naming the path."""
    from vitavla.serving.export import SPEC_FILE, is_policy_dir

    path = Path(path)
    if path.is_file():
        return "lightning"
    if path.is_dir():
        if is_policy_dir(path):
            raise CheckpointSourceError(f"--ckpt_path {path} is already an exported policy directory (it "
                                        f"has {SPEC_FILE}); give it to `vitavla serve` or `vitavla test` as "
                                        "it is")
        return "deepspeed"
    raise CheckpointSourceError(f"--ckpt_path {path} does not exist; expected a `vitavla fit` checkpoint "
                                "file or a DeepSpeed checkpoint directory")


def checkpoint_digest(path: str | Path) -> tuple[str, dict[str, str] | None]:
    """``(sha256, per-file sha256s)`` of a checkpoint. A file: its own sha256 (no per-file map). A DeepSpeed
    directory: each file the reader uses, and one sha256 over the sorted ``name sha256`` lines."""
    from vitavla.deepspeed_ckpt import checkpoint_files
    from vitavla.serving.export import sha256_file

    path = Path(path)
    if path.is_file():
        return sha256_file(path), None
    files = {str(f.relative_to(path)): sha256_file(f) for f in checkpoint_files(path)}
    lines = "".join(f"{name} {sha}\n" for name, sha in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest(), files


def load_checkpoint_into(module: nn.Module, ckpt_path: str | Path) -> str:
    """Load ``ckpt_path`` into ``module`` the way ``vitavla test`` does; returns the checkpoint kind.

    The module's own fit check (:meth:`WindowModule.on_load_checkpoint`) runs on the trainable parameters,
    so a stage-1 checkpoint given with a stage-2 config (or the reverse) is refused, naming the keys. A
    DeepSpeed checkpoint also holds the frozen parameters it was trained with; they are loaded too, after a
    check that each names a parameter or buffer of ``module`` with the same shape."""
    from vitavla.checkpoint_io import LIGHTNING_CKPT_HINT, check_fit, torch_load

    kind = checkpoint_kind(ckpt_path)
    frozen = {}
    if kind == "lightning":
        ckpt = torch_load(ckpt_path, LIGHTNING_CKPT_HINT, map_location="cpu")
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
            raise CheckpointSourceError(f"--ckpt_path {ckpt_path} has no state_dict; is it a `vitavla fit` "
                                        "checkpoint?")
    else:
        from vitavla.deepspeed_ckpt import read_zero_checkpoint

        state, client = read_zero_checkpoint(ckpt_path)
        trainable = module.checkpoint_shapes()
        ckpt = {**client, "state_dict": {k: v for k, v in state.items() if k in trainable}}
        frozen = {k: v for k, v in state.items() if k not in trainable}
        own = module.state_dict()
        check_fit(frozen, {k: own[k].shape for k in frozen if k in own}, ckpt_path,
                  f"{type(module).__name__} (its frozen parameters and buffers)", max_listed=4)
    module.loading_from = str(ckpt_path)  # named by the fit check's message (no Trainer holds the path here)
    module.on_load_checkpoint(ckpt)
    module.load_state_dict({**frozen, **ckpt["state_dict"]}, strict=False)
    return kind


def deployable_policy(module: nn.Module) -> VLAPolicy:
    """The :class:`VLAPolicy` that ``module`` deploys (its ``deployable_policy()``)."""
    fn = getattr(module, "deployable_policy", None)
    policy = fn() if callable(fn) else None
    if not isinstance(policy, VLAPolicy):
        raise CheckpointSourceError(f"the config's model is a {type(module).__name__}, which has no policy "
                                    "to export; export a stage-1 (vitavla.modules.DistillationModule) or "
                                    "stage-2 (vitavla.modules.PolicyModule) checkpoint with the config that "
                                    "trained it")
    return policy
