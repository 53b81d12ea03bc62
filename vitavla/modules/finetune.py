"""Stage 2 (fine-tuning): train the student end to end on actions through the teacher's decoder."""

from __future__ import annotations

import copy
from typing import Literal

import torch

from teachers.base import Teacher
from vitavla.batch import Window
from vitavla.checkpoint_io import CheckpointMismatchError, load_strict, read_state_dict, select_prefix
from vitavla.errors import ConfigError
from vitavla.lora import KEY as LORA_KEY, LoraConfig, apply_lora, is_adapter_parameter
from vitavla.losses import ARM_LOSSES, action_loss, gripper_accuracy
from vitavla.modules.alignment import check_compatible
from vitavla.modules.common import OptimConfig, WindowModule, configure_adamw
from vitavla.policy import VLAPolicy
from vitavla.rollout.lightning import is_rollout_batch, rollout_test_step
from vitavla.streaming import StreamingPolicy
from vitavla.student import ActionMapper, VLAStudent

InitMode = Literal["two_stage", "only_finetune", "freeze_vlm"]


class PolicyModule(WindowModule):
    """Stage 2: loss = MAE(arm) + gripper_loss_weight * BCE(gripper).

    Init modes (paper §4.1):
      - ``two_stage``: state encoder, action token and mapper from a stage-1 checkpoint (``init_from``);
        trains the LLM, state encoder, action token, mapper and decoder.
      - ``only_finetune``: no alignment; decoder from the teacher, fresh mapper; trains the same parts.
      - ``freeze_vlm``: as ``two_stage`` but the LLM stays frozen.
    The vision tower and projector stay frozen in every mode; the decoder always starts from the teacher's.
    With ``lora`` set (``two_stage`` or ``only_finetune``), LoRA adapters on the LLM train in place of its
    weights: the adapters, state encoder, action token, mapper and decoder train, nothing else.
    """

    def __init__(self, student: VLAStudent, teacher: Teacher, init_mode: InitMode = "two_stage",
                 init_from: str | None = None, mapper_hidden_dim: int | None = None,
                 gripper_loss_weight: float = 0.01, optim: OptimConfig | None = None,
                 lora: LoraConfig | None = None, arm_loss: Literal["mae", "smooth_l1"] = "mae"):
        """
        Args:
            student: the VLM student.
            teacher: the action expert whose decoder (``action_head``) is copied; the teacher itself is not kept.
            init_mode: ``two_stage``, ``only_finetune`` or ``freeze_vlm``.
            init_from: stage-1 checkpoint (Lightning .ckpt, .safetensors or DeepSpeed dir) for two_stage/freeze_vlm.
            mapper_hidden_dim: hidden width of the mapper (default: the teacher's hidden size).
            gripper_loss_weight: weight of the gripper BCE term (paper: 0.01).
            optim: optimizer and schedule (paper Table 5: lr 1e-4, 2 warmup epochs, 2 epochs).
            lora: LoRA adapters on the LLM (rank, alpha, dropout, target_modules) instead of fine-tuning all
                of its weights; off (null) in the paper. Needs the ``lora`` extra (peft).
            arm_loss: ``mae`` (paper) or ``smooth_l1`` (Seer's own arm loss, beta 1: the mean of the labels at
                one observation instead of their median; see :func:`vitavla.losses.action_loss`).
        """
        super().__init__()
        if init_mode not in ("two_stage", "only_finetune", "freeze_vlm"):
            raise ValueError(f"init_mode must be two_stage, only_finetune or freeze_vlm, got {init_mode!r}")
        if init_mode != "only_finetune" and init_from is None:
            raise ValueError(f"init_mode={init_mode!r} needs init_from=<stage-1 checkpoint>")
        if arm_loss not in ARM_LOSSES:
            raise ConfigError(f"arm_loss must be one of {ARM_LOSSES}, got {arm_loss!r}")
        if lora is not None and init_mode == "freeze_vlm":
            raise ConfigError(f"{LORA_KEY}: LoRA adapts the LLM, which init_mode=freeze_vlm keeps frozen; use "
                              "init_mode two_stage or only_finetune, or lora: null")
        check_compatible(student, teacher, None)
        head = copy.deepcopy(teacher.action_head)
        mapper = ActionMapper(student.hidden_size, teacher.hidden_size, mapper_hidden_dim)
        self.policy = VLAPolicy(student, mapper, head)
        self.init_mode = init_mode
        self.gripper_loss_weight = gripper_loss_weight
        self.arm_loss = arm_loss
        self.optim = optim or OptimConfig(warmup_epochs=2.0)
        if init_from is not None:
            self.load_alignment(init_from)
        self.policy.requires_grad_(True)
        for m in student.backbone.vision_modules():
            m.requires_grad_(False)
        if init_mode == "freeze_vlm":
            student.backbone.language_model().requires_grad_(False)
        self.lora = lora
        self.lora_targets = [] if lora is None else apply_lora(student.backbone.language_model(), lora)
        self._freeze_unused(student)

    @staticmethod
    def _freeze_unused(student: VLAStudent) -> None:
        """Parameters outside vision, LLM and our additions (e.g. an unused LM head) stay frozen."""
        used = {id(p) for m in [student.backbone.language_model(), *student.backbone.vision_modules()]
                for p in m.parameters()}
        for p in student.backbone.parameters():
            if id(p) not in used:
                p.requires_grad_(False)

    def load_alignment(self, path: str) -> None:
        """State encoder, action token and mapper from a stage-1 (DistillationModule) checkpoint."""
        sd = read_state_dict(path)
        student = self.policy.student
        load_strict(student.state_encoder, select_prefix(sd, "student.state_encoder."), f"{path} [state_encoder]")
        load_strict(self.policy.mapper, select_prefix(sd, "mapper."), f"{path} [mapper]")
        if "student.action_token" not in sd:
            raise ValueError(f"{path} has no 'student.action_token'; is it a stage-1 (DistillationModule) "
                             f"checkpoint? keys: {sorted(sd)[:6]}")
        token = sd["student.action_token"]
        if token.shape != student.action_token.shape:
            raise ValueError(f"{path}: student.action_token has shape {tuple(token.shape)}, expected "
                             f"{tuple(student.action_token.shape)}")
        with torch.no_grad():
            student.action_token.copy_(token)

    def student_module(self) -> VLAStudent:
        return self.policy.student

    def optional_checkpoint_keys(self, stage: str) -> set[str]:
        """For evaluation, the LLM: a ``freeze_vlm`` run saves the same module without it (its LLM is the
        config's, as here), and eval configs build ``only_finetune`` whatever the training mode was. A
        resumed fit needs exactly what this mode saves."""
        if stage == "fit":
            return set()
        llm = {id(p) for p in self.policy.student.backbone.language_model().parameters()}
        # LoRA adapters are the LLM's training: a config that asks for them needs them from the file.
        return {n for n, p in self.named_parameters() if id(p) in llm and not is_adapter_parameter(n)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A LoRA checkpoint given to a model built without ``lora`` (or the reverse) is named as such, before
        the generic key-by-key comparison."""
        state = checkpoint.get("state_dict")
        if state is not None:
            adapters = sorted(k for k in state if is_adapter_parameter(k))
            source = (getattr(getattr(self, "_trainer", None), "ckpt_path", None)
                      or getattr(self, "loading_from", None) or "the checkpoint")
            if adapters and self.lora is None:
                raise CheckpointMismatchError(
                    f"{source} holds LoRA adapters ({len(adapters)} tensors, e.g. {adapters[0]}) but this model "
                    f"has none: set {LORA_KEY} in the config as in the training run")
            llm = self.policy.student.backbone.language_model()
            prefix = next(n for n, m in self.named_modules() if m is llm) + "."
            if self.lora is not None and not adapters and any(k.startswith(prefix) for k in state):
                raise CheckpointMismatchError(
                    f"{source} holds fully fine-tuned LLM weights, not LoRA adapters, but this model is built "
                    f"with {LORA_KEY}; remove it (lora: null) to load this checkpoint")
        super().on_load_checkpoint(checkpoint)

    def parameter_groups(self):
        student = self.policy.student
        return {
            "vision": torch.nn.ModuleList(student.backbone.vision_modules()),
            "llm": student.backbone.language_model(),
            "state_encoder": student.state_encoder,
            "action_token": student.action_token,
            "action_mapper": self.policy.mapper,
            "action_decoder": self.policy.action_head,
        }

    def forward(self, batch: Window):
        return self.policy(batch)

    def _step(self, batch: Window, stage: str):
        batch.validate(self.policy.robot, require_actions=True)
        pred = self.policy(batch)
        loss, parts = action_loss(pred, batch.actions, batch.action_valid, self.policy.robot,
                                  self.gripper_loss_weight, self.arm_loss)
        bs = batch.batch_size
        sync = stage != "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=sync, batch_size=bs)
        self.log(f"{stage}/arm_mae", parts["arm_mae"], sync_dist=sync, batch_size=bs)
        self.log(f"{stage}/gripper_bce", parts["gripper_bce"], sync_dist=sync, batch_size=bs)
        if stage != "train":
            acc = gripper_accuracy(pred, batch.actions, batch.action_valid, self.policy.robot)
            self.log(f"{stage}/gripper_acc", acc, sync_dist=True, batch_size=bs)
        return loss

    def training_step(self, batch: Window, batch_idx: int):
        return self._step(batch, "train")

    def validation_step(self, batch: Window, batch_idx: int):
        return self._step(batch, "val")

    def test_step(self, batch: Window | list, batch_idx: int):
        # RolloutDataModule yields lists of EpisodeSpec: closed-loop episodes instead of an offline loss.
        if is_rollout_batch(batch):
            return rollout_test_step(self, batch)
        return self._step(batch, "test")

    def rollout_policy(self) -> StreamingPolicy:
        """The policy closed-loop evaluation (``vitavla test`` on a RolloutDataModule) runs: the student
        streamed with a KV cache, batched over episodes, with ``image_size`` and ``robot`` attributes."""
        return StreamingPolicy(self.policy)

    def predict_step(self, batch: Window, batch_idx: int):
        return self.policy(batch).as_action()

    def deployable_policy(self) -> VLAPolicy:
        """What ``vitavla export`` writes: the fine-tuned policy."""
        return self.policy

    def configure_optimizers(self):
        return configure_adamw(self, self.optim)
