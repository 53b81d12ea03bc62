"""LoRA for stage 2 (vitavla.lora): what trains, what a step changes, what a checkpoint holds, and the merge
that export calls (merged and unmerged policies act alike)."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch

pytest.importorskip("peft")

from teachers.transformer_teacher import TransformerTeacher  # noqa: E402
from tests.conftest import tiny_backbone, window  # noqa: E402
from vitavla.checkpoint_io import CheckpointMismatchError  # noqa: E402
from vitavla.errors import ConfigError  # noqa: E402
from vitavla.lora import LoraConfig, adapted_modules, merge_lora, resolve_targets  # noqa: E402
from vitavla.modules import OptimConfig, PolicyModule  # noqa: E402
from vitavla.student import VLAStudent  # noqa: E402

LLM = "policy.student.backbone.model.language_model"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# Merged vs unmerged, float32: x @ (W + s B A)^T and x @ W^T + s (x @ A^T) @ B^T differ by summation order
# only, ~1e-7 per layer on these activations; 1e-5 leaves room for the 2 layers plus the decoder.
MERGE_ATOL, MERGE_RTOL = 1e-5, 1e-5


def lora_module(family: str = "internvl", lora: LoraConfig | None = LoraConfig(rank=4, alpha=8, dropout=0.0),
                **kw) -> PolicyModule:
    student = VLAStudent(tiny_backbone(family), max_steps=4)
    teacher = TransformerTeacher(hidden_size=32, num_layers=1, max_steps=8)
    return PolicyModule(student, teacher, init_mode="only_finetune", lora=lora, optim=OptimConfig(lr=1e-2), **kw)


def adapter_names(targets=ATTENTION + MLP, layers: int = 2) -> set[str]:
    """The exact adapter parameter names peft's in-place injection gives the tiny 2-layer Qwen2."""
    return {f"{LLM}.layers.{i}.{'self_attn' if t in ATTENTION else 'mlp'}.{t}.lora_{ab}.default.weight"
            for i in range(layers) for t in targets for ab in "AB"}


# The parts around the LLM that train in every stage-2 mode: state encoder, action token, mapper, decoder.
AROUND_LLM = {
    "policy.student.action_token",
    *(f"policy.student.state_encoder.{m}.{p}" for m in ("arm_encoder", "gripper_encoder", "projector")
      for p in ("weight", "bias")),
    *(f"policy.mapper.net.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")),
    *(f"policy.action_head.{m}.{p}" for m in ("action_decoder.0", "action_decoder.2", "arm_action_decoder.0",
                                              "gripper_action_decoder.0") for p in ("weight", "bias")),
}


@pytest.mark.parametrize("family", ["internvl", "llava"])
def test_only_the_adapters_and_the_parts_around_the_llm_train(family):
    m = lora_module(family, LoraConfig(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    expected = adapter_names(("q_proj", "v_proj")) | AROUND_LLM
    assert {n for n, p in m.named_parameters() if p.requires_grad} == expected
    w = window()
    pred = m(w)
    m.zero_grad(set_to_none=True)
    ((pred.arm - w.actions[..., :6]).abs().mean() + pred.gripper_logit.mean()).backward()
    assert {n for n, p in m.named_parameters() if p.grad is not None} == expected
    # The adapted layers keep their pretrained weight, frozen, under base_layer.
    assert not m.get_parameter(f"{LLM}.layers.0.self_attn.q_proj.base_layer.weight").requires_grad
    assert m.parameter_counts()["llm"]["trainable"] == 2 * 4 * (64 + 64) + 2 * 4 * (64 + 32)  # q: 64->64, v: 64->32


def test_all_linear_adapts_the_same_layers_as_the_seven_projections():
    llm = tiny_backbone("internvl").language_model()
    assert resolve_targets(llm, LoraConfig(target_modules=["all-linear"])) == resolve_targets(llm, LoraConfig())
    assert len(resolve_targets(llm, LoraConfig())) == 2 * 7


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, r"^model.init_args.lora.rank: expected an integer >= 1, got 0$"),
    ({"alpha": 0}, r"^model.init_args.lora.alpha: expected a number > 0, got 0$"),
    ({"dropout": 1.0}, r"^model.init_args.lora.dropout: expected a number in \[0, 1\), got 1.0$"),
    ({"target_modules": []}, r"^model.init_args.lora.target_modules: expected a non-empty list"),
    ({"target_modules": "q_proj"}, r"^model.init_args.lora.target_modules: expected a non-empty list"),
    ({"target_modules": ["all-linear", "q_proj"]}, r"^model.init_args.lora.target_modules: 'all-linear' already"),
])
def test_bad_values_fail_in_one_line_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**kwargs)


def test_unknown_target_and_freeze_vlm_fail_naming_the_field():
    with pytest.raises(ConfigError, match=r"^model.init_args.lora.target_modules: 'qkv' names no Linear layer of "
                                          r"the student's language model \(Qwen2Model\); its Linear layers are "
                                          r"\['down_proj', 'gate_proj', 'k_proj'"):
        lora_module(lora=LoraConfig(target_modules=["qkv"]))
    with pytest.raises(ConfigError, match=r"^model.init_args.lora: LoRA adapts the LLM, which "
                                          r"init_mode=freeze_vlm keeps frozen"):
        PolicyModule(VLAStudent(tiny_backbone("internvl"), max_steps=4),
                     TransformerTeacher(hidden_size=32, num_layers=1, max_steps=8), init_mode="freeze_vlm",
                     init_from="unused.ckpt", lora=LoraConfig())


def _data():
    from datamodules.synthetic import SyntheticWindowDataModule

    return SyntheticWindowDataModule(num_episodes=4, episode_length=6, num_steps=3, batch_size=2,
                                     val_fraction=0.25)


def _trainer(root: Path, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, default_root_dir=root, limit_val_batches=1,
                     num_sanity_val_steps=0, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA module before and after 3 Lightning training steps, and the checkpoint they wrote."""
    root = tmp_path_factory.mktemp("lora_fit")
    torch.manual_seed(0)
    module = lora_module()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = _trainer(root, max_steps=3)
    trainer.fit(module, datamodule=_data())
    ckpt = root / "lora.ckpt"
    trainer.save_checkpoint(ckpt)
    return module.eval(), before, ckpt


def test_a_training_step_changes_exactly_the_trainable_parameters(trained):
    module, before, _ = trained
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert changed == adapter_names() | AROUND_LLM
    # Every frozen weight, the LLM's pretrained ones under base_layer included, is bit-identical.
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    assert any(".base_layer." in n for n in frozen) and any("embed_tokens" in n for n in frozen)
    assert all(torch.equal(module.get_parameter(n), before[n]) for n in frozen)


def test_the_checkpoint_holds_the_adapters_and_loads_into_a_fresh_module(trained, tmp_path):
    module, _, ckpt = trained
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert set(state) == adapter_names() | AROUND_LLM  # adapters, no base weight, no vision
    torch.manual_seed(1)  # other adapter and mapper inits than the trained module's
    fresh = lora_module()
    w = window(num_steps=3)
    with torch.no_grad():
        expected = module(w)
        assert not torch.equal(fresh.eval()(w).arm, expected.arm)
    # Lightning's own load (what `vitavla validate/test --ckpt_path` does), then the same outputs exactly.
    _trainer(tmp_path).validate(fresh, datamodule=_data(), ckpt_path=str(ckpt), verbose=False)
    with torch.no_grad():
        got = fresh.eval()(w)
    assert torch.equal(got.arm, expected.arm) and torch.equal(got.gripper_logit, expected.gripper_logit)


def test_a_lora_checkpoint_is_refused_by_a_model_without_lora_naming_the_key(trained):
    _, _, ckpt = trained
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    plain = lora_module(lora=None)
    plain.loading_from = str(ckpt)
    with pytest.raises(CheckpointMismatchError, match=r"lora.ckpt holds LoRA adapters \(28 tensors, e.g. "
                                                      r"policy\..*lora_A.default.weight\) but this model has none: "
                                                      r"set model.init_args.lora"):
        plain.on_load_checkpoint(checkpoint)


def test_merged_policy_acts_like_the_adapted_one_with_the_plain_key_layout(trained, tmp_path):
    from vitavla.serving.export import export_policy, load_policy_dir

    module, before, _ = trained
    lora_b = [p for n, p in module.named_parameters() if ".lora_B." in n]
    assert all(p.abs().max() > 0 for p in lora_b)  # trained away from their zero init: the merge does work
    policy = copy.deepcopy(module.policy).eval()
    w = window(num_steps=3)
    with torch.no_grad():
        adapted = policy(w)
        assert merge_lora(policy) is policy
        merged = policy(w)
    torch.testing.assert_close(merged.arm, adapted.arm, atol=MERGE_ATOL, rtol=MERGE_RTOL)
    torch.testing.assert_close(merged.gripper_logit, adapted.gripper_logit, atol=MERGE_ATOL, rtol=MERGE_RTOL)
    assert not adapted_modules(policy)
    q = "layers.0.self_attn.q_proj"
    merged_q = policy.get_parameter(f"{LLM.removeprefix('policy.')}.{q}.weight")
    assert not torch.equal(merged_q, before[f"{LLM}.{q}.base_layer.weight"])  # the adapter is folded in
    # The key layout of a policy built without LoRA, so the strict loaders of export and serving take it.
    plain = lora_module(lora=None).policy.eval()
    assert set(policy.state_dict()) == set(plain.state_dict())
    plain.load_state_dict(policy.state_dict(), strict=True)
    out = export_policy(policy, tmp_path / "policy", normalizer=None)
    exported = load_policy_dir(out)
    with torch.no_grad():
        assert torch.equal(plain(w).arm, merged.arm)
        # Loaded from its exported directory: the same weights, actions equal up to float round-off (the
        # export tests say why, tests/serving/test_export.py ACTION_ATOL).
        torch.testing.assert_close(exported.policy(w).arm, merged.arm, rtol=0, atol=1e-6)
    assert merge_lora(plain) is plain and set(plain.state_dict()) == set(policy.state_dict())  # no adapters: no-op


# -- vitavla plan: LoRA shrinks gradients and optimizer states, and changes what a block keeps ---------------
def _plan_config(path: str = "tiny", lora: dict | None = None) -> dict:
    from tests.vitavla.conftest import config

    cfg = config("stage2", path)
    if lora is not None:
        cfg["model"]["init_args"]["lora"] = lora
    return cfg


@pytest.mark.parametrize("scale, lora", [
    ("tiny", {"rank": 8, "alpha": 16, "dropout": 0.0}),
    ("tiny", {"rank": 8, "alpha": 16, "dropout": 0.1}),
    ("tiny", {"rank": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}),
    ("small", {"rank": 8, "alpha": 16, "dropout": 0.1}),
])
def test_plan_activations_with_lora_are_within_20_percent_of_the_measured_saved_tensors(scale, lora, tmp_path,
                                                                                        one_thread):
    from tests.vitavla.conftest import measured_and_planned, saved_tensor_bytes, small_backbone_dir

    path = "tiny" if scale == "tiny" else small_backbone_dir(tmp_path)
    module, batch, plan = measured_and_planned(_plan_config(path, lora))
    measured = saved_tensor_bytes(module, batch)
    print(f"{scale} {lora}: predicted {plan.activations.saved:,.0f} B, measured {measured:,} B")
    assert abs(plan.activations.saved - measured) <= 0.2 * measured
    assert plan.lora.rank == 8 and plan.lora.dropout == (lora["dropout"] > 0)


def test_plan_model_states_count_only_the_adapters_of_the_llm():
    from vitavla.plan import make_plan

    full = make_plan(_plan_config(), devices=2)
    lora = make_plan(_plan_config(lora={"rank": 8, "alpha": 16, "dropout": 0.0}), devices=2)
    llm = full.parts["llm"]["trainable"]
    # Per block, rank 8 x (in + out) of q 64+64, k 64+32, v 64+32, o 64+64, gate/up 64+128, down 128+64.
    adapters = 2 * 8 * (128 + 96 + 96 + 128 + 192 + 192 + 192)
    assert lora.parts["llm"] == {"trainable": adapters, "frozen": llm}
    assert lora.trainable == full.trainable - llm + adapters
    # 32-true: 4 B gradients and 8 B AdamW moments per trainable parameter; ZeRO-2 splits both over 2 GPUs.
    assert lora.rows["ZeRO-0 (DDP)"]["grads"] == 4 * lora.trainable
    assert lora.rows["ZeRO-2"]["optim"] == 8 * lora.trainable / 2
    assert lora.frozen_bytes == full.frozen_bytes + 4 * llm


def test_plan_of_the_libero_lora_config_at_paper_size(capsys):
    from vitavla.plan import main

    main(["--config", "configs/finetune_libero_lora.yaml", "--devices", "1", "--gpu_memory", "24",
          "--backbone_config", "paper"])
    out = capsys.readouterr().out
    # 28 blocks x rank 16 x (in + out) summed over Qwen2.5-7B's seven projections; the 7.07B weights frozen.
    assert "llm                     40,370,176   7,070,619,136" in out
    assert "frozen weights, rank-16 LoRA on down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj, with " \
           "dropout" in out


# -- vitavla fit from the tiny LoRA config -------------------------------------------------------------------
def test_vitavla_fit_with_the_tiny_lora_config_saves_the_adapters(tmp_path):
    from tests.conftest import ONLY_FINETUNE, fit

    ckpt = fit("tiny_finetune_lora.yaml", tmp_path / "lora", *ONLY_FINETUNE)
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    # rank 4 on all seven projections of both blocks, and the SeerTeacher's decoder (same layout as above).
    assert set(checkpoint["state_dict"]) == adapter_names() | AROUND_LLM
    assert checkpoint["state_dict"][f"{LLM}.layers.1.mlp.down_proj.lora_A.default.weight"].shape == (4, 128)
    config = next((tmp_path / "lora").glob("version_*/config.yaml")).read_text()
    assert "lora:\n      rank: 4\n      alpha: 8.0\n      dropout: 0.0" in config
    # `vitavla export` merges the adapters: the directory has the plain layout and acts like the adapted policy.
    from cli import build_cli
    from tests.conftest import CONFIGS
    from vitavla.serving.export import export_from_config, load_checkpoint_into, load_policy_dir

    out = export_from_config([str(CONFIGS / "tiny_finetune_lora.yaml")], ckpt, tmp_path / "policy",
                             ONLY_FINETUNE, allow_missing_normalizer=True)
    exported = load_policy_dir(out)
    assert not adapted_modules(exported.policy)
    module = build_cli(["--config", str(CONFIGS / "tiny_finetune_lora.yaml"), *ONLY_FINETUNE,
                        "--trainer.logger=false"], run=False).model
    load_checkpoint_into(module, ckpt)  # as `vitavla test` would: frozen weights from the config, the rest here
    assert adapted_modules(module.policy)
    w = window(num_steps=module.policy.student.max_steps)
    with torch.no_grad():
        adapted, merged = module.policy.eval()(w), exported.policy(w)
    torch.testing.assert_close(merged.arm, adapted.arm, atol=MERGE_ATOL, rtol=MERGE_RTOL)
    torch.testing.assert_close(merged.gripper_logit, adapted.gripper_logit, atol=MERGE_ATOL, rtol=MERGE_RTOL)


def test_libero_lora_config_parses():
    from cli import build_cli

    with pytest.raises(SystemExit) as e:
        build_cli(["fit", "--config", "configs/finetune_libero_lora.yaml", "--print_config"], run=True)
    assert e.value.code in (0, None)


def test_lora_fields_are_documented_in_the_cli_help(capsys):
    from cli import main

    with pytest.raises(SystemExit) as e:
        main(["fit", "--model.help", "vitavla.modules.PolicyModule", "--model.lora.help"])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    assert "Rank r of each adapter" in out and "alpha / rank" in out and '["all-linear"]' in out
