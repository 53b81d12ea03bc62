"""What both training stages share: optimizer and schedule, parameter accounting, slim checkpoints."""

from __future__ import annotations

import math
from dataclasses import dataclass
import lightning as L
import torch
from torch import Tensor, nn

from vitavla.batch import Window
from vitavla.checkpoint_io import check_fit
from vitavla.errors import ConfigError


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay (paper Table 5)."""

    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_epochs: float = 1.0
    """Warmup length in epochs (paper: 1 for alignment, 2 for fine-tuning); converted to optimizer steps."""
    warmup_steps: int | None = None
    """Warmup in optimizer steps; overrides ``warmup_epochs`` when set."""
    min_lr_ratio: float = 0.0
    """Floor of the cosine decay, as a fraction of ``lr``."""
    fused: bool | None = None
    """torch's fused AdamW kernel. None (auto): on when every trained parameter is on the CPU and the trainer
    runs without mixed precision. There torch otherwise steps one tensor at a time, about 5x slower for the
    quickstart's models (benchmarks/optimizer_step.py); Lightning refuses gradient clipping with a fused
    optimizer under mixed precision, and on GPUs torch's default (foreach) is already batched."""


def cosine_with_warmup(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear ramp over ``warmup`` steps, then cosine down to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def schedule_lengths(trainer: L.Trainer, cfg: OptimConfig) -> tuple[int, int]:
    """(warmup steps, total steps) in optimizer steps, gradient accumulation included."""
    total = max(1, int(trainer.estimated_stepping_batches))
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps, total
    epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
    per_epoch = total / epochs
    return min(total, int(round(cfg.warmup_epochs * per_epoch))), total


def use_fused_adamw(cfg: OptimConfig, params: list[Tensor], precision: str) -> bool:
    """``cfg.fused``, or when unset: every parameter on the CPU and no mixed precision (see ``fused``)."""
    if cfg.fused is not None:
        return cfg.fused
    return all(p.device.type == "cpu" for p in params) and "mixed" not in precision


def configure_adamw(module: L.LightningModule, cfg: OptimConfig):
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(module).__name__} has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas),
                            fused=use_fused_adamw(cfg, params, str(module.trainer.precision)))
    warmup, total = schedule_lengths(module.trainer, cfg)

    def factor(step: int) -> float:
        return cosine_with_warmup(step, warmup, total, cfg.min_lr_ratio)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def count_parameters(named: dict[str, nn.Module | nn.Parameter]) -> dict[str, dict[str, int]]:
    """Trainable / frozen parameter counts per named part (shared tensors counted once per part)."""
    out = {}
    for name, part in named.items():
        params = [part] if isinstance(part, nn.Parameter) else list(part.parameters())
        out[name] = {
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "frozen": sum(p.numel() for p in params if not p.requires_grad),
        }
    return out


def format_parameter_table(counts: dict[str, dict[str, int]]) -> str:
    rows = [f"{'part':<22}{'trainable':>16}{'frozen':>16}"]
    for name, c in counts.items():
        rows.append(f"{name:<22}{c['trainable']:>16,}{c['frozen']:>16,}")
    tot_t = sum(c["trainable"] for c in counts.values())
    tot_f = sum(c["frozen"] for c in counts.values())
    rows.append(f"{'total':<22}{tot_t:>16,}{tot_f:>16,}")
    return "\n".join(rows)


class WindowModule(L.LightningModule):
    """Base for the stage modules: moves Windows to the device, saves only what trains.

    Frozen weights (vision tower, teacher, and in stage 1 the whole VLM) come back from the paths in the
    config, so checkpoints hold only trainable parameters: ~30M instead of ~8B parameters for stage 1.
    """

    def __init__(self):
        super().__init__()
        self.strict_loading = False

    def setup(self, stage: str) -> None:
        """Fail before the first step, naming both sides, when the data's robot differs from the model's."""
        data = getattr(self.trainer, "datamodule", None)
        robot = getattr(data, "robot", None)
        student = self.student_module()
        # ConfigError (a UserFacingError): a mismatch of two config sections is a usage mistake, printed by
        # the CLI as this one line, not as a traceback from inside Lightning's setup.
        if robot is not None:
            try:
                robot.check_compatible(student.robot, f"data ({type(data).__name__})", "student")
            except ValueError as err:
                raise ConfigError(str(err)) from err
        size = getattr(data, "image_size", None)
        if size is not None and size != student.backbone.image_size:
            raise ConfigError(f"data.init_args.image_size: {type(data).__name__} yields {size}px images but "
                              f"the student backbone is configured for {student.backbone.image_size}px "
                              "(model.init_args.student.init_args.backbone.init_args.image_size); set both "
                              "to the same size")

    def student_module(self):
        raise TypeError(f"{type(self).__name__} must define student_module()")

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        if isinstance(batch, Window):
            return batch.to(device, non_blocking=True)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def parameter_groups(self) -> dict[str, nn.Module | nn.Parameter]:
        raise TypeError(f"{type(self).__name__} must define parameter_groups()")

    def parameter_counts(self) -> dict[str, dict[str, int]]:
        return count_parameters(self.parameter_groups())

    def on_fit_start(self) -> None:
        counts = self.parameter_counts()
        self.print(f"{type(self).__name__} parameters:\n{format_parameter_table(counts)}")
        for logger in self.loggers:
            logger.log_hyperparams({f"params/{k}_{kind}": v[kind] for k, v in counts.items()
                                    for kind in ("trainable", "frozen")})

    normalizer_state: dict | None = None
    """The data's action normalization (plain lists), kept with the weights so inference can un-normalize."""

    def checkpoint_shapes(self) -> dict[str, torch.Size]:
        """What a checkpoint of this module holds (see :meth:`on_save_checkpoint`): the trainable parameters."""
        return {n: p.shape for n, p in self.named_parameters() if p.requires_grad}

    def optional_checkpoint_keys(self, stage: str) -> set[str]:
        """Keys of :meth:`checkpoint_shapes` that a checkpoint loaded for ``stage`` may lack: none here."""
        return set()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = self.checkpoint_shapes()
        sd = checkpoint.get("state_dict")
        if sd is not None:
            checkpoint["state_dict"] = {k: v for k, v in sd.items() if k in trainable}
        trainer = getattr(self, "_trainer", None)
        norm = getattr(getattr(trainer, "datamodule", None), "normalizer", None)
        if norm is not None:
            self.normalizer_state = norm.state_dict()
        if self.normalizer_state is not None:
            checkpoint["normalizer"] = self.normalizer_state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another module before its weights are loaded.

        Loading is not strict (frozen weights are not in the file), so without this a stage-1 checkpoint
        given to a stage-2 ``test`` would load nothing and evaluate an untrained policy. The file must hold
        exactly what this module saves, with the same shapes.
        """
        state = checkpoint.get("state_dict")
        if state is not None:  # None: DeepSpeed keeps the weights beside this client state
            trainer = getattr(self, "_trainer", None)
            fn = getattr(getattr(trainer, "state", None), "fn", None)
            stage = getattr(fn, "value", "predict")
            expected = {k: v for k, v in self.checkpoint_shapes().items()
                        if k in state or k not in self.optional_checkpoint_keys(stage)}
            # Outside a Trainer (vitavla export) the reader sets loading_from, so the message names the file.
            source = (getattr(trainer, "ckpt_path", None) or getattr(self, "loading_from", None)
                      or "the checkpoint")
            check_fit(state, expected, source, f"{type(self).__name__} (its trainable parameters, which its "
                      "checkpoints hold)", max_listed=4,
                      notes=["a stage-1 (DistillationModule) checkpoint goes to PolicyModule's init_from, not "
                             "to --ckpt_path; a checkpoint must come from the same model configuration"])
        self.normalizer_state = checkpoint.get("normalizer", self.normalizer_state)
