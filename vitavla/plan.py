"""``vitavla plan``: will a training config fit on N GPUs? Model states under ZeRO and activations, per GPU.

    vitavla plan --config configs/finetune_calvin.yaml --devices 8 --gpu_memory 80 --backbone_config paper
    vitavla plan --config configs/finetune_calvin.yaml --config configs/gpu/1x24gb_finetune.yaml \
        --gpu_memory 24 --backbone_config paper     # layered like `vitavla fit --config A --config B`

The config's model is built on the meta device (no memory, no weights; checkpoint files need not exist), so
the trainable / frozen split is the one the stage module sets after construction. From it:

* **Model states** (ZeRO paper, Rajbhandari et al. 2020, mixed-precision Adam): each trainable parameter
  costs ``p`` bytes of weights, ``g`` of gradients and ``o`` of optimizer states (fp32 master copy + Adam's
  two moments); a frozen one costs its weight only. ZeRO-2 splits gradients and optimizer states over the
  N ranks, ZeRO-3 the weights too; CPU offload moves the optimizer (ZeRO-2) or everything (ZeRO-3) to host
  RAM, listed in its own column.
* **Activations** per micro-batch: bytes autograd keeps from forward to backward in the LLM, counted op by
  op for a Qwen2/LLaMA decoder block with fused SDPA attention (the method of Korthikanti et al. 2022,
  §4.1, recounted for RMSNorm, rotary embeddings, grouped-query attention and a SwiGLU MLP); see
  :func:`vitavla.activation_bytes.llm_activation_bytes`. The sequence length is the student's token layout per window.
* **LoRA** (``model.init_args.lora``): the LLM's weights are frozen and only the adapters join the trainable
  set, so its gradients and optimizer states shrink to the adapters'; the blocks keep what the adapters need
  instead of the weight inputs (:mod:`vitavla.activation_bytes`).
* **This config's figure**: ``trainer.strategy`` picks the row (:func:`strategy_row`) and the backbone's
  ``gradient_checkpointing`` the activation column; that per-GPU total (:attr:`Plan.configured_total`) and
  the global batch (ranks x micro-batch x ``accumulate_grad_batches``) close the report.

Several ``--config`` files are layered as ``vitavla fit`` layers them (:func:`vitavla.config_layers.merge_configs`).

``tests/vitavla/test_plan.py`` checks both against tensor-level measurements of real CPU training steps.
"""

from __future__ import annotations

import argparse
import inspect
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vitavla.activation_bytes import (ActivationEstimate, LLMShape, LoraActivations, llm_activation_bytes,
                                      lora_activations)
from vitavla.config_layers import import_class, load_configs
from vitavla.errors import ConfigError

GIB = 1024 ** 3
BACKBONE_KEY = "model.init_args.student.init_args.backbone.init_args.path"
# trainer.precision -> (trainable bytes: weights, gradients, optimizer states; frozen weight bytes or None =
# the weight's own dtype; activation bytes or None = the LLM weights' dtype).
PRECISIONS = {
    # DeepSpeed bf16: module cast to bf16, bf16 gradients, fp32 master weights + Adam moments in the optimizer.
    "bf16-mixed": ((2, 2, 12), 2, 2),
    "16-mixed": ((2, 2, 12), 2, 2),
    "bf16-true": ((2, 2, 4), 2, 2),  # torch AdamW keeps its moments in the parameter dtype
    "16-true": ((2, 2, 4), 2, 2),
    "32-true": ((4, 4, 8), None, None),
}
_PRECISION_ALIASES = {"bf16": "bf16-mixed", "16": "16-mixed", "32": "32-true", "64-true": "32-true"}


def _precision(value) -> str:
    key = str(value if value is not None else "32-true")
    key = _PRECISION_ALIASES.get(key, key)
    if key not in PRECISIONS:
        raise ConfigError(f"trainer.precision: vitavla plan knows {sorted(PRECISIONS)}, got {value!r}")
    return key


# ---- the configured strategy -----------------------------------------------------------------------------
_ZERO0_STRATEGIES = {"auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "single_device",
                     "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false"}


def _zero_row(stage: int, offload: bool) -> str | None:
    if stage == 0:
        return "ZeRO-0 (DDP)"
    if stage in (2, 3):
        return f"ZeRO-{stage}" + (" + CPU offload" if offload else "")
    return None  # ZeRO-1 (optimizer states only) has no row


def strategy_row(strategy) -> str | None:
    """The plan's row for a ``trainer.strategy`` value (a Lightning name or a ``{class_path, init_args}``
    DeepSpeed node), or None where the plan has none (ZeRO-1, FSDP, a custom strategy)."""
    from vitavla.strategies import DEEPSPEED_PRESETS

    if strategy is None or (isinstance(strategy, str) and strategy in _ZERO0_STRATEGIES):
        return "ZeRO-0 (DDP)"
    if isinstance(strategy, str):
        if strategy in DEEPSPEED_PRESETS:
            return _zero_row(*DEEPSPEED_PRESETS[strategy])
        if strategy.startswith("deepspeed_cpu_stage_") and strategy[-1].isdigit():
            return _zero_row(int(strategy[-1]), False)
        return None
    if isinstance(strategy, dict) and str(strategy.get("class_path", "")).endswith("DeepSpeedStrategy"):
        args = strategy.get("init_args") or {}
        ds = _deepspeed_config(args.get("config"))
        if ds is not None:  # a full DeepSpeed config replaces Lightning's arguments
            zero = ds.get("zero_optimization") or {}
            stage = int(zero.get("stage", 0))
            opt_dev = (zero.get("offload_optimizer") or {}).get("device", "none")
            par_dev = (zero.get("offload_param") or {}).get("device", "none")
            offload_opt, offload_par = opt_dev not in (None, "none"), par_dev not in (None, "none")
        else:
            stage = int(args.get("stage", 2))
            offload_opt = bool(args.get("offload_optimizer"))
            offload_par = bool(args.get("offload_parameters"))
        if stage == 3 and offload_opt != offload_par:
            return None  # the plan's ZeRO-3 offload row moves both
        if stage == 2 and offload_par:
            return None
        return _zero_row(stage, offload_opt)
    return None


def _deepspeed_config(value) -> dict | None:
    """``DeepSpeedStrategy(config=...)``: a dict, or the path of a JSON file, read as Lightning reads it
    (relative to the current directory)."""
    key = "trainer.strategy.init_args.config"
    if value is None or isinstance(value, dict):
        return value
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}: {str(value)!r} is not a file (a relative path is read from the current "
                          "directory, as Lightning reads it)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{key}: {path} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: {path} holds {type(data).__name__}, not a DeepSpeed config object")
    return data


def _strategy_label(strategy) -> str:
    if isinstance(strategy, dict):
        args = strategy.get("init_args") or {}
        name = str(strategy.get("class_path", "?")).rpartition(".")[2]
        if isinstance(args.get("config"), str):
            return f"{name}(config={args['config']})"
        shown = ("stage", "offload_optimizer", "offload_parameters")
        return f"{name}({', '.join(f'{k}={args[k]}' for k in shown if k in args)})"
    return str(strategy if strategy is not None else "auto")


def _ranks(trainer: dict) -> int:
    """Data-parallel ranks the trainer section asks for: ``devices`` (an int, a list of indices, a digit
    string; 'auto' and -1 count as 1) x ``num_nodes``."""
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes", 1)
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, (list, tuple)):
        devices = len(devices)
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        devices = 1
    if isinstance(nodes, str) and nodes.strip().isdigit():
        nodes = int(nodes)
    if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
        raise ConfigError(f"trainer.num_nodes: expected an integer >= 1, got {nodes!r}")
    return devices * nodes


# ---- building the config's module on the meta device ------------------------------------------------------
def _backbone_dir(path: str, backbone_config: str | None, tmp: Path) -> str:
    """A directory holding the backbone's config.json: the configured one, or ``--backbone_config``."""
    if backbone_config is None:
        if path == "tiny" or (Path(path).expanduser() / "config.json").is_file():
            return path
        raise ConfigError(f"{BACKBONE_KEY}: {path!r} holds no config.json, so the backbone's shape is unknown; "
                          "download the checkpoint (only config.json is read) or pass --backbone_config paper "
                          "(VITA-1.5's shape: InternViT-300M + Qwen2.5-7B) or --backbone_config DIR")
    if backbone_config == "paper":
        from vitavla.backbones.tiny import paper_internvl_config

        (tmp / "config.json").write_text(json.dumps(paper_internvl_config().to_dict()))
        return str(tmp)
    root = Path(backbone_config).expanduser()
    root = root.parent if root.name == "config.json" else root
    if not (root / "config.json").is_file():
        raise ConfigError(f"--backbone_config: {backbone_config!r} is neither 'paper' nor a directory with a "
                          "config.json")
    return str(root)


def _build(node, key: str, overrides: dict | None = None):
    """Instantiate a ``{class_path, init_args}`` node; plain values pass through."""
    if not (isinstance(node, dict) and "class_path" in node):
        return node
    cls = import_class(node["class_path"], key)
    args = dict(node.get("init_args") or {})
    args.update(overrides or {})
    try:
        return cls(**args)
    except (TypeError, ValueError, FileNotFoundError) as err:
        raise ConfigError(f"{key}: {cls.__name__} cannot be built for planning: {err}") from err


def build_planned_module(config: dict, backbone_config: str | None = None, device: str = "meta") -> nn.Module:
    """The config's stage module with random-init backbone and teacher (no weights file read), on the meta
    device; ``device="cpu"`` builds the same module with real tensors (the plan's tests measure it)."""
    from vitavla.modules.common import OptimConfig
    from vitavla.modules.finetune import PolicyModule

    model = config.get("model")
    if not isinstance(model, dict) or "class_path" not in model:
        raise ConfigError("model.class_path: the config has no model section to plan")
    module_cls = import_class(model["class_path"], "model")
    args = dict(model.get("init_args") or {})
    student_node = args.get("student") or {}
    student_args = dict(student_node.get("init_args") or {})
    backbone_node = student_args.get("backbone")
    if not isinstance(backbone_node, dict):
        raise ConfigError("model.init_args.student.init_args.backbone: missing")
    with tempfile.TemporaryDirectory() as tmp, torch.device(device):
        bb_args = dict(backbone_node.get("init_args") or {})
        bb_args["path"] = _backbone_dir(str(bb_args.get("path", "tiny")), backbone_config, Path(tmp))
        if bb_args["path"] != "tiny":
            bb_args["init"] = "random"
        backbone = _build({"class_path": backbone_node["class_path"], "init_args": bb_args},
                          "model.init_args.student.init_args.backbone")
        student_args["backbone"] = backbone
        student = _build({"class_path": student_node["class_path"], "init_args": student_args},
                         "model.init_args.student")
        teacher_node = args.get("teacher")
        teacher_cls = import_class(teacher_node["class_path"], "model.init_args.teacher")
        params = inspect.signature(teacher_cls).parameters
        # Weights files fill values, never shapes: plan without them.
        extra = {"init": "random"} if "init" in params else {}
        if "checkpoint" in params:
            extra["checkpoint"] = None
        teacher = _build(teacher_node, "model.init_args.teacher", extra)
        args["student"], args["teacher"] = student, teacher
        if isinstance(args.get("optim"), dict):
            args["optim"] = OptimConfig(**args["optim"])
        if isinstance(args.get("lora"), dict):
            # LoRA freezes the LLM's weights: only the adapters join the trainable set, whose gradients
            # and optimizer states the model-state rows count.
            from vitavla.lora import LoraConfig

            args["lora"] = LoraConfig(**args["lora"])
        if issubclass(module_cls, PolicyModule) and args.get("init_from") is not None:
            # The stage-1 file only fills the state encoder, action token and mapper: same shapes, same
            # trainable set, so planning skips reading it.
            module_cls = type(module_cls.__name__, (module_cls,), {"load_alignment": lambda self, path: None})
        try:
            return module_cls(**args)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model: {module_cls.__name__} cannot be built for planning: {err}") from err


def window_tokens(student, num_steps: int, instruction_tokens: int) -> dict[str, int]:
    """The student's sequence for one window (see ``VLAStudent.forward``), by kind."""
    per_step = {"image": student.num_views * student.backbone.tokens_per_image, "state": 1,
                "action": student.robot.action_chunk}
    text = min(instruction_tokens, student.max_instruction_tokens)
    out = {k: v * num_steps for k, v in per_step.items()}
    out["instruction"] = text * num_steps if student.instruction_per_step else text
    out["total"] = sum(out.values())
    return out


# ---- the plan ---------------------------------------------------------------------------------------------
@dataclass
class Plan:
    module: str
    precision: str
    devices: int
    batch: int
    tokens: dict[str, int]
    parts: dict[str, dict[str, int]]
    trainable: int
    frozen_bytes: float
    activations: ActivationEstimate
    checkpointing_configured: bool
    llm_trainable: bool
    lora: LoraActivations | None = None
    gpu_memory_gib: float | None = None
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    strategy: str = "auto"
    """``trainer.strategy`` as configured (a name, or a class path)."""
    strategy_row: str | None = None
    """The row of :attr:`rows` that strategy is, None where the plan has no row for it."""
    accumulate: int = 1
    """``trainer.accumulate_grad_batches``."""

    @property
    def configured_total(self) -> float | None:
        """GPU bytes per rank of this config as configured: its strategy's model states plus the
        activations with or without checkpointing, as its backbone sets it. None without a strategy row."""
        if self.strategy_row is None:
            return None
        r = self.rows[self.strategy_row]
        acts = self.activations.peak_checkpointed if self.checkpointing_configured else self.activations.saved
        return r["params"] + r["grads"] + r["optim"] + acts

    @property
    def global_batch(self) -> int:
        """Windows per optimizer step: ranks x micro-batch x accumulate_grad_batches."""
        return self.devices * self.batch * self.accumulate


def _frozen_bytes(module: nn.Module, frozen_dtype_bytes: int | None) -> float:
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) in seen or p.requires_grad:
            continue
        seen.add(id(p))
        total += p.numel() * (frozen_dtype_bytes or p.element_size())
    return total


def model_state_rows(trainable: int, frozen_bytes: float, precision: str, devices: int) -> dict[str, dict]:
    """GPU bytes of weights, gradients and optimizer states per rank (and host RAM per rank)."""
    (p, g, o), _, _ = PRECISIONS[precision]
    n = devices
    t = trainable
    return {
        "ZeRO-0 (DDP)": dict(params=p * t + frozen_bytes, grads=g * t, optim=o * t, cpu=0.0),
        "ZeRO-2": dict(params=p * t + frozen_bytes, grads=g * t / n, optim=o * t / n, cpu=0.0),
        "ZeRO-3": dict(params=(p * t + frozen_bytes) / n, grads=g * t / n, optim=o * t / n, cpu=0.0),
        # Offloaded gradients reach the host through the reduce buckets (not counted); the host holds the
        # optimizer's fp32 gradient partition next to its states.
        "ZeRO-2 + CPU offload": dict(params=p * t + frozen_bytes, grads=0.0, optim=0.0, cpu=(o + 4) * t / n),
        "ZeRO-3 + CPU offload": dict(params=0.0, grads=0.0, optim=0.0,
                                     cpu=(p * t + frozen_bytes) / n + (o + 4) * t / n),
    }


def make_plan(config: dict, devices: int | None = None, backbone_config: str | None = None,
              instruction_tokens: int | None = None, gpu_memory_gib: float | None = None) -> Plan:
    from vitavla.modules.common import count_parameters

    trainer = config.get("trainer") or {}
    precision = _precision(trainer.get("precision"))
    if devices is None:
        devices = _ranks(trainer)
    if devices < 1:
        raise ConfigError(f"--devices must be >= 1, got {devices}")
    module = build_planned_module(config, backbone_config)
    student = module.student_module()
    backbone = student.backbone
    data_args = (config.get("data") or {}).get("init_args") or {}
    batch = int(data_args.get("batch_size", 1))
    steps = int(data_args.get("num_steps", student.max_steps))
    text = student.max_instruction_tokens if instruction_tokens is None else instruction_tokens
    tokens = window_tokens(student, steps, text)
    llm = backbone.language_model()
    llm_config = getattr(llm, "config", None)
    if llm_config is None:
        raise ConfigError(f"{BACKBONE_KEY}: the backbone's language model has no transformers config to "
                          "read layers and widths from")
    attn = getattr(llm_config, "_attn_implementation", "sdpa")
    if attn not in ("sdpa", None):
        raise ConfigError(f"model.init_args.student.init_args.backbone.init_args.attn_implementation: the plan "
                          f"models fused SDPA attention, got {attn!r}")
    _, frozen_size, act_size = PRECISIONS[precision]
    llm_trainable = any(p.requires_grad for p in llm.parameters())
    e = act_size or next(llm.parameters()).element_size()
    lora = lora_activations(llm)
    acts = llm_activation_bytes(LLMShape.of(llm_config), batch, tokens["total"], e, llm_trainable, lora)
    trainable = sum(p.numel() for p in {id(p): p for p in module.parameters() if p.requires_grad}.values())
    parts = count_parameters(module.parameter_groups())
    plan = Plan(type(module).__name__, precision, devices, batch, tokens, parts, trainable,
                _frozen_bytes(module, frozen_size), acts, bool(getattr(llm, "gradient_checkpointing", False)),
                llm_trainable, lora, gpu_memory_gib)
    plan.rows = model_state_rows(trainable, plan.frozen_bytes, precision, devices)
    plan.strategy = _strategy_label(trainer.get("strategy"))
    plan.strategy_row = strategy_row(trainer.get("strategy"))
    accumulate = trainer.get("accumulate_grad_batches", 1)
    if not isinstance(accumulate, int) or isinstance(accumulate, bool) or accumulate < 1:
        raise ConfigError("trainer.accumulate_grad_batches: the plan reads a fixed integer >= 1, "
                          f"got {accumulate!r}")
    plan.accumulate = accumulate
    return plan


def format_plan(plan: Plan, config_name: str = "") -> str:
    lines = [f"vitavla plan: {config_name} ({plan.module}) on {plan.devices} GPU(s), precision {plan.precision}"]
    lines.append(f"{'part':<18}{'trainable':>16}{'frozen':>16}")
    for name, c in plan.parts.items():
        lines.append(f"{name:<18}{c['trainable']:>16,}{c['frozen']:>16,}")
    tok = plan.tokens
    lines.append(f"sequence per window: {tok['total']} tokens (image {tok['image']}, instruction "
                 f"{tok['instruction']}, state {tok['state']}, action {tok['action']}); micro-batch {plan.batch}")
    acts = plan.activations
    a_plain, a_ckpt = acts.saved, acts.peak_checkpointed
    fit = plan.gpu_memory_gib
    # Tiny configs in MiB, so that their figures are not all 0.00.
    big = max(r["params"] + r["grads"] + r["optim"] for r in plan.rows.values()) + a_plain >= GIB
    unit, uname = (GIB, "GiB") if big else (1024 ** 2, "MiB")

    def _gib(x: float) -> str:
        return f"{x / unit:,.2f}"

    head = (f"{uname + ' per GPU':<22}{'params':>9}{'grads':>9}{'optim':>9}{'states':>9}{'+ acts':>9}"
            f"{'+ acts ckpt':>12}{'host RAM':>10}")
    if fit:
        head += f"  fits {fit:g} GiB (plain / ckpt)"
    lines += ["", head]
    for name, r in plan.rows.items():
        states = r["params"] + r["grads"] + r["optim"]
        row = (f"{name:<22}{_gib(r['params']):>9}{_gib(r['grads']):>9}{_gib(r['optim']):>9}{_gib(states):>9}"
               f"{_gib(states + a_plain):>9}{_gib(states + a_ckpt):>12}{_gib(r['cpu']):>10}")
        if fit:
            marks = ["yes" if (states + a) / GIB <= fit else "no" for a in (a_plain, a_ckpt)]
            row += f"  {marks[0]:>4} / {marks[1]}"
        lines.append(row)
    ck = "on" if plan.checkpointing_configured else "off"
    lines += ["",
              f"activations per micro-batch: {_gib(a_plain)} {uname} without checkpointing, {_gib(a_ckpt)} {uname} with "
              f"(checkpoints {_gib(acts.saved_checkpointed)} + one recomputed block {_gib(acts.per_layer)}); "
              f"this config has checkpointing {ck} (backbone gradient_checkpointing)",
              _configured_line(plan, _gib, uname),
              f"global batch: {plan.global_batch} windows per optimizer step = {plan.devices} GPU(s) x "
              f"micro-batch {plan.batch} x accumulate_grad_batches {plan.accumulate}",
              "assumes: " + _assumptions(plan)]
    return "\n".join(lines)


def _configured_line(plan: Plan, _gib, uname: str) -> str:
    total = plan.configured_total
    if total is None:
        return (f"this config (trainer.strategy {plan.strategy}): the plan has no row for this strategy; "
                "read the one closest to it above")
    ck = "with" if plan.checkpointing_configured else "without"
    host = _gib(plan.rows[plan.strategy_row]["cpu"])
    line = (f"this config: {_gib(total)} {uname} per GPU ({plan.strategy_row}, trainer.strategy "
            f"{plan.strategy}, {ck} checkpointing), {host} {uname} host RAM per GPU")
    if plan.gpu_memory_gib:
        line += f"; fits {plan.gpu_memory_gib:g} GiB: {'yes' if total / GIB <= plan.gpu_memory_gib else 'no'}"
    return line


def _assumptions(plan: Plan) -> str:
    (p, g, o), frozen, act = PRECISIONS[plan.precision]
    weights = f"{frozen}-byte" if frozen else "own-dtype"
    return (f"{plan.precision}: trainable parameters cost {p} B weights + {g} B gradients + {o} B AdamW states "
            f"(fp32 master + 2 moments under mixed precision), frozen ones {weights} weights; activations in "
            f"{act or 'the LLM weight'}-byte dtype, LLM blocks only ({_llm_training(plan)}), fused SDPA attention, "
            "no dropout but LoRA's; instruction at its token cap unless --instruction_tokens; "
            "not counted: DeepSpeed buckets, CUDA context (~0.5-1 GiB), allocator fragmentation, frozen "
            "vision/teacher forward temporaries.")


def _llm_training(plan: Plan) -> str:
    if plan.lora is not None:
        drop = ", with dropout" if plan.lora.dropout else ""
        return f"frozen weights, rank-{plan.lora.rank} LoRA on {', '.join(sorted(plan.lora.targets))}{drop}"
    return "trainable weights" if plan.llm_trainable else "frozen weights"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="vitavla plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, action="append",
                    help="a training YAML (stage 1 or stage 2); repeat it to layer overrides, later over "
                         "earlier, as `vitavla fit` does")
    ap.add_argument("--devices", type=int, default=None,
                    help="data-parallel ranks, all nodes (default: trainer.devices x trainer.num_nodes; "
                         "'auto' counts as 1)")
    ap.add_argument("--gpu_memory", type=float, default=None, help="GiB per GPU: adds a fits column")
    ap.add_argument("--backbone_config", default=None,
                    help="'paper' (VITA-1.5's shape) or a directory with config.json, when the config's backbone "
                         "path is not on this machine")
    ap.add_argument("--instruction_tokens", type=int, default=None,
                    help="instruction length in tokens (default: the student's cap, max_instruction_tokens)")
    args = ap.parse_args(argv)
    name = " + ".join(args.config)
    try:
        config = load_configs(args.config)
    except ConfigError as err:
        raise SystemExit(f"vitavla plan: error: {err}") from None
    try:
        plan = make_plan(config, args.devices, args.backbone_config, args.instruction_tokens, args.gpu_memory)
    except ConfigError as err:
        raise SystemExit(f"vitavla plan: error: {name}: {err}") from None
    print(format_plan(plan, name))


if __name__ == "__main__":
    main()
