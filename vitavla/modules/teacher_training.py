"""Training a teacher itself (e.g. Seer) on the same datamodules, with the teacher's own objective.

The result is a file the teacher class loads through its ``checkpoint`` argument, so stage 1 refers to it
with ``teacher.init_args.checkpoint: <log_dir>/teacher.safetensors`` and the same other teacher arguments.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from teachers.base import Teacher
from vitavla.batch import Window
from vitavla.losses import action_metrics
from vitavla.modules.common import OptimConfig, WindowModule, configure_adamw
from vitavla.rollout.lightning import is_rollout_batch, rollout_test_step
from vitavla.rollout.teacher_policy import WindowedTeacherPolicy


class TeacherModule(WindowModule):
    """Trains a teacher through its ``training_loss`` (Seer: smooth-L1 arm + 0.01 BCE gripper + 0.1 foresight,
    random-shift augmentation) and exports it at the end of fit.

    Validation logs the teacher's objective (``val/loss`` and its parts) and the student's offline action
    metrics computed by the same function as ``PolicyModule`` (``val/arm_mae``, ``val/gripper_bce``,
    ``val/gripper_acc``), so teacher and student rows of a table are comparable. Gradient clipping (Seer:
    max norm 0.1) is the trainer's ``gradient_clip_val``.

    Windows: a teacher whose objective reads frames past the steps the model sees (Seer: foresight targets
    ``objective.future_steps`` = 3 ahead) trains on windows of ``max_steps + future_steps`` steps, as Seer
    loads ``sequence_length + 3`` frames. The objective gets the whole window; the action metrics and
    predictions use its first ``max_steps`` steps, the ones the model reads.
    """

    def __init__(self, teacher: Teacher, optim: OptimConfig | None = None,
                 export_path: str | None = "teacher.safetensors"):
        """
        Args:
            teacher: the teacher to train, built un-frozen; the parts it freezes itself (Seer: MAE ViT, CLIP
                text tower) stay frozen.
            optim: optimizer and schedule (Seer: AdamW lr 1e-3, weight decay 1e-4, cosine with warmup).
            export_path: where the trained teacher is written at the end of fit, in the format its
                ``checkpoint`` argument reads; a relative path is under the run's log directory. None: no
                export.
        """
        super().__init__()
        if getattr(teacher, "_frozen", False):
            raise ValueError(f"TeacherModule trains the teacher, but this {type(teacher).__name__} was frozen "
                             "(teacher.freeze()); pass it un-frozen")
        if not any(p.requires_grad for p in teacher.parameters()):
            raise ValueError(f"{type(teacher).__name__} has no trainable parameters; TeacherModule has nothing "
                             "to train")
        self.teacher = teacher
        self.optim = optim or OptimConfig(lr=1e-3, weight_decay=1e-4, warmup_epochs=1.0)
        self.export_path = export_path
        self.exported_to: Path | None = None

    def setup(self, stage: str) -> None:
        """Fail before the first step, naming both sides, when the data does not fit the teacher."""
        data = getattr(self.trainer, "datamodule", None)
        name = f"data ({type(data).__name__})"
        robot = getattr(data, "robot", None)
        if robot is not None:
            robot.check_compatible(self.teacher.robot, name, f"teacher ({type(self.teacher).__name__})")
        size = getattr(data, "image_size", None)
        if size is not None and size != self.teacher.image_size:
            raise ValueError(f"{name} yields {size}px images but the teacher reads {self.teacher.image_size}px")
        steps = getattr(data, "num_steps", None)
        limit = self.teacher.max_steps
        future = self.future_steps
        fits = steps is None or limit is None or steps <= limit or (future > 0 and steps == limit + future)
        if not fits:
            extra = (f" or exactly {limit} + future_steps {future} = {limit + future} (the extra frames are "
                     "foresight targets)") if future else ""
            raise ValueError(f"{name} yields windows of num_steps={steps} but the teacher "
                             f"({type(self.teacher).__name__}) takes at most {limit} steps{extra}")

    @property
    def future_steps(self) -> int:
        """Frames past the model's steps that the teacher's objective reads (Seer: ``objective.future_steps``;
        0 for a teacher without such an objective)."""
        return int(getattr(getattr(self.teacher, "objective", None), "future_steps", 0) or 0)

    def model_steps(self, batch: Window) -> Window:
        """The steps of ``batch`` the teacher's model reads: its first ``max_steps`` when a training window
        carries ``future_steps`` trailing foresight frames, else all of it."""
        limit = self.teacher.max_steps
        if limit is not None and batch.num_steps > limit and batch.num_steps == limit + self.future_steps:
            return batch.slice_steps(0, limit)
        return batch

    def parameter_groups(self):
        return dict(self.teacher.named_children())

    def forward(self, batch: Window):
        return self.teacher.predict(self.model_steps(batch))

    def training_step(self, batch: Window, batch_idx: int):
        loss, parts = self.teacher.training_loss(batch)
        bs = batch.batch_size
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=bs)
        return loss

    def _evaluate(self, batch: Window, stage: str) -> None:
        robot = self.teacher.robot
        batch.validate(robot, require_actions=True)
        loss, parts = self.teacher.training_loss(batch)  # the whole window: trailing frames are its targets
        seen = self.model_steps(batch)
        metrics = action_metrics(self.teacher.predict(seen), seen.actions, seen.action_valid, robot)
        bs = batch.batch_size
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True, batch_size=bs)
        for name, value in parts.items():
            self.log(f"{stage}/{name}", value, sync_dist=True, batch_size=bs)
        for name in ("arm_mae", "gripper_bce", "gripper_acc"):
            self.log(f"{stage}/{name}", metrics[name], sync_dist=True, batch_size=bs)

    def validation_step(self, batch: Window, batch_idx: int):
        self._evaluate(batch, "val")

    def test_step(self, batch: Window | list, batch_idx: int):
        # RolloutDataModule yields lists of EpisodeSpec: the teacher itself runs closed-loop in the simulator,
        # the baseline a distilled student is compared with.
        if is_rollout_batch(batch):
            return rollout_test_step(self, batch)
        self._evaluate(batch, "test")

    def rollout_policy(self) -> WindowedTeacherPolicy:
        """The teacher as a closed-loop policy: its own forward over the last ``max_steps`` observations
        every step, as Seer's inference wrapper does; batched over episodes."""
        return WindowedTeacherPolicy(self.teacher)

    def predict_step(self, batch: Window, batch_idx: int):
        return self.teacher.predict(self.model_steps(batch)).as_action()

    def configure_optimizers(self):
        return configure_adamw(self, self.optim)

    def resolve_export_path(self) -> Path | None:
        if self.export_path is None:
            return None
        path = Path(self.export_path).expanduser()
        if not path.is_absolute():
            trainer = getattr(self, "_trainer", None)
            root = (trainer.log_dir or trainer.default_root_dir) if trainer is not None else "."
            path = Path(root) / path
        return path

    def export(self, path: str | Path) -> Path:
        """Write the teacher as its ``checkpoint`` argument reads it, with the data's normalizer as metadata
        (stage 1 and 2 must normalise actions the same way the teacher was trained)."""
        metadata = {}
        trainer = getattr(self, "_trainer", None)
        norm = getattr(getattr(trainer, "datamodule", None), "normalizer", None)
        state = norm.state_dict() if norm is not None else self.normalizer_state
        if state is not None:
            metadata["normalizer"] = json.dumps(state)
        return self.teacher.export(path, metadata)

    def on_fit_end(self) -> None:
        path = self.resolve_export_path()
        if path is not None and self.trainer.is_global_zero:
            self.exported_to = self.export(path)
            self.print(f"TeacherModule: wrote the trained {type(self.teacher).__name__} to {self.exported_to}; "
                       f"use it as teacher.init_args.checkpoint")
        # Other ranks must not run ahead (e.g. into a test stage reading the file) before it exists.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.trainer.strategy.barrier("teacher_export")
