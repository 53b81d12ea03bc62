"""Builders shared by the core package's tests: tiny stage modules, a training loop, and `vitavla plan`
configs measured against real CPU steps."""

from __future__ import annotations

import json

import torch

from teachers.transformer_teacher import TransformerTeacher
from tests.conftest import tiny_backbone, window
from vitavla.backbones.tiny import tiny_internvl_config
from vitavla.plan import build_planned_module, make_plan
from vitavla.student import VLAStudent


# Tiny stage modules: the module, bf16 and LoRA tests build them.
def student(**kw) -> VLAStudent:
    """The tiny InternVL student, 4 steps."""
    return VLAStudent(tiny_backbone("internvl"), max_steps=4, **kw)


def teacher(**kw) -> TransformerTeacher:
    """A one-layer, 32-wide transformer teacher."""
    return TransformerTeacher(hidden_size=32, num_layers=1, max_steps=8, **kw)


def overfit(module, loss_fn, steps: int, lr: float) -> tuple[float, float]:
    """``steps`` AdamW steps on ``module``'s trainable parameters; returns the first and the final loss."""
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr)
    first = None
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    return first, loss_fn().item()


# `vitavla plan` against measurements: the plan and LoRA tests.
STAGES = {
    "stage1": {"class_path": "vitavla.modules.DistillationModule", "init_args": {}},
    "stage2": {"class_path": "vitavla.modules.PolicyModule", "init_args": {"init_mode": "only_finetune"}},
}
STEPS, BATCH = 4, 2


def small_backbone_dir(tmp_path) -> str:
    """A config.json at 'small' scale: the tiny InternViT under a 4-layer, 256-wide Qwen2 with GQA."""
    cfg = tiny_internvl_config().to_dict()
    cfg["text_config"].pop("layer_types", None)  # derived from num_hidden_layers
    cfg["text_config"].update(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                              num_key_value_heads=2)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


def config(stage: str, path: str = "tiny", checkpointing: bool = False, precision: str = "32-true") -> dict:
    """One stage's plan config: the InternVL backbone at ``path``, the tiny SeerTeacher, BATCH x STEPS."""
    backbone = {"class_path": "vitavla.backbones.InternVLBackbone",
                "init_args": {"path": path, "tokens_per_image": 4, "gradient_checkpointing": checkpointing}}
    module = {"class_path": STAGES[stage]["class_path"], "init_args": {
        **STAGES[stage]["init_args"],
        "student": {"class_path": "vitavla.student.VLAStudent",
                    "init_args": {"backbone": backbone, "max_steps": STEPS}},
        "teacher": {"class_path": "teachers.SeerTeacher", "init_args": {"preset": "tiny"}}}}
    return {"trainer": {"precision": precision}, "model": module,
            "data": {"init_args": {"batch_size": BATCH, "num_steps": STEPS}}}


def saved_tensor_bytes(module, batch) -> int:
    """Bytes autograd keeps from forward to backward in a training step: every tensor saved for backward,
    each storage once, parameters excluded (they are counted as weights)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = module.training_step(batch, 0)
    loss.backward()
    return sum(kept.values())


def measured_and_planned(cfg: dict):
    """The module ``cfg`` builds (on the CPU, in training mode), a batch that fits it, and its plan."""
    torch.manual_seed(0)
    module = build_planned_module(cfg, device="cpu").train()
    module.log = lambda *a, **k: None  # outside a Trainer
    batch = window(module.student_module().robot, batch_size=BATCH, num_steps=STEPS)
    text = module.student_module().instruction_tokens(batch.instruction)[0].shape[1]
    plan = make_plan(cfg, devices=1, instruction_tokens=text)
    return module, batch, plan
