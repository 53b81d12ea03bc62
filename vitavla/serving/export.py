"""A self-contained policy directory, written by ``vitavla export``, read by ``vitavla test`` / ``serve``.

A training checkpoint holds only the trainable parameters; the frozen towers come back from paths in the
training config, which a robot computer does not have. An exported directory holds everything::

    DIR/policy.json          what to build (class_path + init_args per part), robot spec, image size, history
                             length, observation keys, the action normalizer, provenance (checkpoint sha256)
    DIR/model.safetensors    every weight of the VLAPolicy, frozen vision tower and projector included
    DIR/backbone/            the VLM's config.json and tokenizer files (what ``transformers`` needs to build
                             the architecture and tokenize; no weights, no code)
    DIR/source_config.yaml   the resolved training/eval config the policy came from (provenance only)

Loading never unpickles (JSON + safetensors) and never runs code from DIR: every ``class_path`` in
``policy.json`` must name a class in vitavla's own packages (:data:`ALLOWED_PACKAGES`), and the backbone is
built with ``init="random"`` and ``trust_remote_code=False`` from ``backbone/config.json`` before the
weights are loaded over it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitavla.action_head import ActionHead
from vitavla.batch import RobotSpec
from vitavla.errors import UserFacingError
from vitavla.normalizer import Normalizer
from vitavla.policy import VLAPolicy
from vitavla.serving.sources import (checkpoint_digest, checkpoint_kind, deployable_policy,
                                     load_checkpoint_into)

FORMAT = "vitavla-policy"
VERSION = 1
SPEC_FILE = "policy.json"
WEIGHTS_FILE = "model.safetensors"
BACKBONE_DIR = "backbone"
SOURCE_CONFIG_FILE = "source_config.yaml"
ALLOWED_PACKAGES = ("vitavla", "teachers", "datamodules")
"""Top-level packages whose classes ``policy.json`` may name; anything else is refused before import."""

DEFAULT_OBS_KEYS = {
    "views": ["observation/image", "observation/wrist_image"],
    "state": "observation/state",
    "prompt": "prompt",
    "reset": "reset",
}
"""openpi's LIBERO example names (static camera, wrist camera, proprio state, instruction), plus ``reset``:
an observation with ``reset: True`` starts a new episode of its connection's session."""


class ExportError(UserFacingError, ValueError):
    """A policy directory that cannot be written or read; the message names the file and the field."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_policy_dir(path: str | Path | None) -> bool:
    """Whether ``path`` is a directory written by :func:`export_policy` (holds ``policy.json``)."""
    return path is not None and Path(path).is_dir() and (Path(path) / SPEC_FILE).is_file()


# -- writing -----------------------------------------------------------------------------------------
def _class_path(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _backbone_spec(backbone: nn.Module) -> dict:
    from vitavla.backbones.llava import HFVLMBackbone

    if not isinstance(backbone, HFVLMBackbone):
        raise ExportError(f"export supports transformers backbones (HFVLMBackbone subclasses such as "
                          f"InternVLBackbone, LlavaBackbone); the student has {type(backbone).__name__}")
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[backbone.dtype]
    return {"class_path": _class_path(backbone), "init_args": {
        # Relative to the policy directory; the weights come from model.safetensors, so the architecture is
        # built from config.json alone ("random") and overwritten.
        "path": BACKBONE_DIR, "init": "random", "trust_remote_code": False,
        "tokens_per_image": backbone.tokens_per_image, "image_size": backbone.image_size,
        "pool": backbone.pool, "dtype": dtype,
        "attn_implementation": backbone.config._attn_implementation or "sdpa",
        # Explicit: a reload from config.json alone would otherwise fall back to the family's defaults.
        "image_mean": list(backbone.image_mean), "image_std": list(backbone.image_std),
    }}


def policy_spec(policy: VLAPolicy) -> dict:
    """``class_path``/``init_args`` of the policy's parts, read from the live objects (not the training
    config), so defaults that the config left out are recorded too."""
    student, mapper, head = policy.student, policy.mapper, policy.action_head
    if type(head) is not ActionHead:
        raise ExportError(f"export supports the teacher's ActionHead decoder, the policy has "
                          f"{type(head).__name__}")
    if student.num_views != 2:
        raise ExportError(f"export supports two camera views (static, wrist: the rollout contract), the "
                          f"student has num_views={student.num_views}")
    r = student.robot
    return {"class_path": _class_path(VLAPolicy), "init_args": {
        "student": {"class_path": _class_path(student), "init_args": {
            "backbone": _backbone_spec(student.backbone), "arm_dim": r.arm_dim, "gripper_dim": r.gripper_dim,
            "gripper_state": r.gripper_state, "gripper_state_dim": r.gripper_state_dim,
            "action_chunk": r.action_chunk, "max_steps": student.max_steps,
            "instruction_per_step": student.instruction_per_step, "attention": student.attention,
            "max_instruction_tokens": student.max_instruction_tokens, "num_views": student.num_views}},
        "mapper": {"class_path": _class_path(mapper), "init_args": {
            "in_dim": mapper.in_dim, "out_dim": mapper.out_dim, "hidden_dim": mapper.net[0].out_features}},
        "action_head": {"class_path": _class_path(head), "init_args": {
            "hidden_size": head.hidden_size, "arm_dim": head.arm_action_decoder[0].out_features,
            "gripper_dim": head.gripper_action_decoder[0].out_features,
            "decoder_width": head.action_decoder[0].out_features}},
    }}


def export_policy(policy: VLAPolicy, out: str | Path, normalizer: Normalizer | None, *,
                  source_config: str | None = None, checkpoint: str | Path | None = None,
                  obs_keys: dict | None = None, overwrite: bool = False,
                  source_module: str | None = None) -> Path:
    """Write ``policy`` (with its normalizer and provenance) to the directory ``out``; returns it.

    ``checkpoint``: the file or DeepSpeed directory the weights came from (hashed into the provenance);
    ``source_module``: the class path of the training module they were loaded into.
    The directory is assembled next to ``out`` and renamed into place, so ``out`` is either absent or
    complete. ``out`` must not exist unless ``overwrite``.
    """
    from vitavla.lora import merge_lora

    # LoRA adapters are folded into their base weights (in place): the directory holds the plain layout of
    # the same model without LoRA, so loading it needs neither peft nor the training config's lora section.
    merge_lora(policy)
    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"--out {out} already exists; pass --overwrite true to replace it")
    spec = policy_spec(policy)
    keys = check_obs_keys(obs_keys or {}, policy.student.num_views, "obs_keys")
    robot = policy.robot
    if normalizer is not None and (normalizer.arm_dim, normalizer.gripper_dim) != (robot.arm_dim,
                                                                                   robot.gripper_dim):
        raise ExportError(f"the normalizer has {normalizer.arm_dim} + {normalizer.gripper_dim} action "
                          f"values, the policy predicts {robot.arm_dim} + {robot.gripper_dim}")
    tmp = out.parent / f".{out.name}.tmp-export"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / BACKBONE_DIR).mkdir(parents=True)
    try:
        from safetensors.torch import save_file

        backbone = policy.student.backbone
        backbone.config.save_pretrained(tmp / BACKBONE_DIR)
        backbone.tokenizer.save_pretrained(tmp / BACKBONE_DIR)
        tensors = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "producer": FORMAT})
        digest, files = (None, None) if checkpoint is None else checkpoint_digest(checkpoint)
        provenance = {"exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "checkpoint": None if checkpoint is None else str(checkpoint),
                      "checkpoint_kind": None if checkpoint is None else checkpoint_kind(checkpoint),
                      "checkpoint_sha256": digest,
                      "checkpoint_files_sha256": files,  # a DeepSpeed directory: each shard read
                      "source_module": source_module,
                      "source_config": SOURCE_CONFIG_FILE if source_config is not None else None,
                      "weights_sha256": sha256_file(tmp / WEIGHTS_FILE)}
        if source_config is not None:
            (tmp / SOURCE_CONFIG_FILE).write_text(source_config)
        doc = {"format": FORMAT, "version": VERSION, "policy": spec, "robot": asdict(robot),
               "image_size": int(backbone.image_size), "history_length": int(policy.student.max_steps),
               "action_dim": robot.action_dim, "action_chunk": robot.action_chunk,
               "action_units": "robot" if normalizer is not None else "normalized",
               "normalizer": None if normalizer is None else normalizer.state_dict(),
               "obs_keys": keys, "provenance": provenance}
        (tmp / SPEC_FILE).write_text(json.dumps(doc, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_obs_keys(obs_keys: Any, num_views: int, where: str) -> dict:
    """``obs_keys`` over :data:`DEFAULT_OBS_KEYS`, checked: ``views`` a list of ``num_views`` distinct
    strings, the others strings, no unknown fields, no key used twice."""
    if not isinstance(obs_keys, dict):
        raise ExportError(f"{where} must be a mapping like {json.dumps(DEFAULT_OBS_KEYS)}, got "
                          f"{type(obs_keys).__name__}")
    unknown = sorted(set(obs_keys) - set(DEFAULT_OBS_KEYS))
    if unknown:
        raise ExportError(f"{where} has unknown fields {unknown}; expected some of "
                          f"{sorted(DEFAULT_OBS_KEYS)}")
    keys = {**DEFAULT_OBS_KEYS, **obs_keys}
    views = keys["views"]
    if not (isinstance(views, list) and len(views) == num_views and all(isinstance(v, str) for v in views)):
        raise ExportError(f"{where}.views must list {num_views} observation keys (static camera, wrist "
                          f"camera), got {views!r}")
    for name in ("state", "prompt", "reset"):
        if not isinstance(keys[name], str) or not keys[name]:
            raise ExportError(f"{where}.{name} must be a non-empty string, got {keys[name]!r}")
    used = [*views, keys["state"], keys["prompt"], keys["reset"]]
    if len(set(used)) != len(used):
        raise ExportError(f"{where} uses a key twice: {used}")
    return keys


# -- reading -----------------------------------------------------------------------------------------
def _resolve_class(class_path: Any, where: str) -> type:
    if not isinstance(class_path, str) or "." not in class_path:
        raise ExportError(f"{where}.class_path must be a dotted class name, got {class_path!r}")
    module, _, name = class_path.rpartition(".")
    if module.split(".")[0] not in ALLOWED_PACKAGES:
        raise ExportError(f"{where}.class_path {class_path!r} is not one of vitavla's own classes (allowed "
                          f"packages: {', '.join(ALLOWED_PACKAGES)}); refusing to import it")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ExportError(f"{where}.class_path {class_path!r} does not exist in this vitavla: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ExportError(f"{where}.class_path {class_path!r} is not a torch module class")
    return cls


def instantiate(spec: Any, where: str, root: Path) -> Any:
    """Build ``{"class_path", "init_args"}`` recursively; plain values pass through. Only allow-listed
    classes (see :data:`ALLOWED_PACKAGES`); a backbone's relative ``path`` is resolved against ``root``."""
    if not (isinstance(spec, dict) and "class_path" in spec):
        return spec
    unknown = set(spec) - {"class_path", "init_args"}
    if unknown:
        raise ExportError(f"{where} has unknown fields {sorted(unknown)}; expected class_path and init_args")
    cls = _resolve_class(spec["class_path"], where)
    args = spec.get("init_args") or {}
    if not isinstance(args, dict):
        raise ExportError(f"{where}.init_args must be a mapping, got {type(args).__name__}")
    kwargs = {k: instantiate(v, f"{where}.{k}", root) for k, v in args.items()}
    from vitavla.backbones.llava import HFVLMBackbone

    if issubclass(cls, HFVLMBackbone):
        if kwargs.get("trust_remote_code") or kwargs.get("init") != "random":
            raise ExportError(f"{where}: an exported backbone is built with init='random' and "
                              f"trust_remote_code=false (weights come from {WEIGHTS_FILE})")
        kwargs["path"] = str(root / str(kwargs.get("path", BACKBONE_DIR)))
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ExportError(f"{where}: {spec['class_path']} does not take these init_args: {e}") from e


@dataclass
class ExportedPolicy:
    """A loaded policy directory: the :class:`VLAPolicy` (eval mode), its normalizer and ``policy.json``."""

    root: Path
    policy: VLAPolicy
    normalizer: Normalizer | None
    spec: dict

    @property
    def robot(self) -> RobotSpec:
        return self.policy.robot

    @property
    def image_size(self) -> int:
        return int(self.spec["image_size"])

    @property
    def history_length(self) -> int:
        return int(self.spec["history_length"])

    @property
    def obs_keys(self) -> dict:
        return self.spec["obs_keys"]

    def streaming(self):
        """A fresh :class:`~vitavla.streaming.StreamingPolicy` (own KV cache) over the shared weights."""
        from vitavla.streaming import StreamingPolicy

        return StreamingPolicy(self.policy, max_steps=self.history_length)


def read_spec(root: str | Path) -> dict:
    root = Path(root)
    path = root / SPEC_FILE
    if not path.is_file():
        raise ExportError(f"{root} is not an exported policy directory (no {SPEC_FILE}); write one with "
                          "`vitavla export --config ... --ckpt_path ... --out DIR`")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else doc
        raise ExportError(f"{path}: format must be {FORMAT!r}, got {got!r}")
    if doc.get("version") != VERSION:
        raise ExportError(f"{path}: version {doc.get('version')!r} is not supported (this vitavla reads "
                          f"version {VERSION})")
    for key in ("policy", "robot", "image_size", "history_length", "obs_keys"):
        if key not in doc:
            raise ExportError(f"{path} has no {key!r} field")
    return doc


@contextmanager
def parameters_on_meta():
    """While active, every parameter a module registers is put on the meta device: no storage, and the
    init that follows registration (``reset_parameters``, transformers' ``_init_weights``) computes nothing
    and draws no random numbers. Buffers stay real: non-persistent ones (rotary frequencies) are computed
    at construction and are not in the weights file. As ``accelerate.init_empty_weights(include_buffers=
    False)``; a parameter created from a real tensor is allocated for that one call, then dropped.
    Process-wide while active: build nothing else in another thread meanwhile."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def assign_weights(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Make the tensors of ``state`` the parameters and persistent buffers of ``module`` (built under
    :func:`parameters_on_meta`): strict, no copy (``assign=True``), each cast to the dtype the module was
    built with where it differs. Fails naming the first tensor still on the meta device afterwards."""
    from vitavla.checkpoint_io import check_fit

    own = module.state_dict()
    check_fit(state, {k: v.shape for k, v in own.items()}, source, type(module).__name__)
    state = {k: v if v.dtype == own[k].dtype else v.to(own[k].dtype) for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.device.type == "meta":
            raise ExportError(f"{source}: {name} is neither in the file nor computed at construction (it is "
                              "still on the meta device)")


def load_policy_dir(root: str | Path, device: str | torch.device = "cpu",
                    verify: bool = True) -> ExportedPolicy:
    """Build the policy of ``root`` from ``policy.json`` and load ``model.safetensors`` into it (strict).

    The policy is built with its parameters on the meta device (:func:`parameters_on_meta`) and the file's
    tensors become its parameters (``assign=True``): a 7B policy is never materialised with random weights
    first, and the weights are in memory once, read straight to ``device``.

    ``verify``: check the weights file against the sha256 recorded at export (a truncated or swapped file
    is named instead of loading wrong weights)."""
    from safetensors.torch import load_file

    root = Path(root)
    doc = read_spec(root)
    weights = root / WEIGHTS_FILE
    if not weights.is_file():
        raise ExportError(f"{root} has no {WEIGHTS_FILE}")
    recorded = (doc.get("provenance") or {}).get("weights_sha256")
    if verify and recorded and sha256_file(weights) != recorded:
        raise ExportError(f"{weights} does not match the sha256 recorded in {SPEC_FILE} at export "
                          "(corrupted or replaced); re-export the policy")
    with parameters_on_meta():
        policy = instantiate(doc["policy"], "policy", root)
    if not isinstance(policy, VLAPolicy):
        raise ExportError(f"{root / SPEC_FILE}: policy.class_path must build a VLAPolicy, got "
                          f"{type(policy).__name__}")
    robot = RobotSpec(**doc["robot"])
    if robot != policy.robot:
        raise ExportError(f"{root / SPEC_FILE}: robot {robot} differs from the built student's "
                          f"{policy.robot}")
    assign_weights(policy, load_file(str(weights), device=str(torch.device(device))), str(weights))
    policy.to(device).eval().requires_grad_(False)  # moves the buffers computed at construction
    norm = doc.get("normalizer")
    normalizer = None if norm is None else Normalizer.from_state_dict(norm)
    doc["obs_keys"] = check_obs_keys(doc["obs_keys"], policy.student.num_views,
                                     f"{root / SPEC_FILE}: obs_keys")
    return ExportedPolicy(root, policy, normalizer, doc)


# -- `vitavla export` --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    """``vitavla export --config CFG --ckpt_path CKPT --out DIR [--model.init_args.X=...]``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="vitavla export",
        description="Write a self-contained policy directory (weights incl. frozen towers as safetensors, "
                    "config, normalizer, tokenizer, provenance) for `vitavla test --ckpt_path DIR` and "
                    "`vitavla serve DIR`. Other --key=value options are passed to the config parser.")
    parser.add_argument("--config", action="append", required=True,
                        help="the training or eval YAML whose model section built the checkpoint "
                             "(repeatable)")
    parser.add_argument("--ckpt_path", required=True,
                        help="checkpoint written by `vitavla fit`: a .ckpt file or a DeepSpeed checkpoint "
                             "directory, of stage 1 (DistillationModule) or stage 2 (PolicyModule)")
    parser.add_argument("--out", required=True, help="directory to create")
    parser.add_argument("--overwrite", default="false", choices=["true", "false"],
                        help="replace --out if it exists")
    parser.add_argument("--allow_missing_normalizer", default="false", choices=["true", "false"],
                        help="export a checkpoint without an action normalizer (the server then returns "
                             "normalized actions: arm in [-1, 1], gripper in [0, 1])")
    parser.add_argument("--obs_keys", default=None,
                        help="JSON: the observation keys `vitavla serve` reads, e.g. '{\"views\": "
                             "[\"cam_high\", \"cam_wrist\"], \"state\": \"qpos\"}'; unset fields keep "
                             f"openpi's LIBERO names {json.dumps(DEFAULT_OBS_KEYS)}")
    args, rest = parser.parse_known_args(argv)
    try:
        try:
            obs_keys = None if args.obs_keys is None else json.loads(args.obs_keys)
        except json.JSONDecodeError as e:
            raise ExportError(f"--obs_keys is not valid JSON: {e}") from e
        out = export_from_config(args.config, args.ckpt_path, args.out, rest, obs_keys=obs_keys,
                                 overwrite=args.overwrite == "true",
                                 allow_missing_normalizer=args.allow_missing_normalizer == "true")
    except UserFacingError as e:
        sys.exit(f"vitavla: error: {type(e).__name__}: {e}")
    print(f"exported policy to {out}")


def export_from_config(configs: list[str], ckpt_path: str | Path, out: str | Path, overrides: list[str] = (),
                       overwrite: bool = False, allow_missing_normalizer: bool = False,
                       obs_keys: dict | None = None) -> Path:
    """Build the model of ``configs`` as ``vitavla test`` would, load ``ckpt_path`` (a checkpoint file or a
    DeepSpeed directory, of a stage-1 or stage-2 module: :mod:`vitavla.serving.sources`) into it, export
    the policy it deploys."""
    from vitavla.lightning_cli import build_cli

    checkpoint_kind(ckpt_path)  # a missing or wrong path fails before the model is built
    args = [a for c in configs for a in ("--config", str(c))] + list(overrides) + ["--trainer.logger=false"]
    cli = build_cli(args, run=False)
    module = cli.model
    policy = deployable_policy(module)
    load_checkpoint_into(module, ckpt_path)
    state = getattr(module, "normalizer_state", None)
    if state is None and not allow_missing_normalizer:
        raise ExportError(f"--ckpt_path {ckpt_path} has no action normalizer (checkpoint['normalizer']), so "
                          "the policy cannot return robot units; pass --allow_missing_normalizer true to "
                          "export it returning normalized actions")
    normalizer = None if state is None else Normalizer.from_state_dict(state)
    source = cli.parser.dump(cli.config, skip_none=False)
    return export_policy(policy, out, normalizer, source_config=source, checkpoint=ckpt_path,
                         obs_keys=obs_keys, overwrite=overwrite, source_module=_class_path(module))
