"""Stage modules: which parameters train, losses fall, stage 1 feeds stage 2, mismatches fail early."""

import lightning as L
import pytest
import torch

from tests.conftest import window
from tests.vitavla.conftest import overfit, student, teacher
from vitavla.checkpoint_io import CheckpointMismatchError, read_state_dict
from vitavla.modules import DistillationModule, OptimConfig, PolicyModule


def grad_names(module, loss):
    module.zero_grad(set_to_none=True)
    loss.backward()
    return {n for n, p in module.named_parameters() if p.grad is not None}


def names_under(module, *prefixes):
    return {n for n, _ in module.named_parameters() if n.startswith(prefixes)}


def test_stage1_trains_only_state_encoder_action_token_and_mapper():
    m = DistillationModule(student(), teacher())
    got = grad_names(m, m.losses(window())["loss"])
    expected = names_under(m, "student.state_encoder.", "student.action_token", "mapper.")
    assert got == expected
    assert {n for n, p in m.named_parameters() if p.requires_grad} == expected
    assert not m.teacher.training and not any(p.requires_grad for p in m.teacher.parameters())
    m.train()
    assert not m.teacher.training  # a frozen teacher stays in eval mode (dropout off)


@pytest.mark.parametrize("mode", ["two_stage", "only_finetune", "freeze_vlm"])
def test_stage2_gradient_sets(mode, tmp_path):
    s1 = DistillationModule(student(), teacher())
    ckpt = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": {k: v for k, v in s1.state_dict().items()
                               if k.startswith(("student.state_encoder", "student.action_token", "mapper"))}}, ckpt)
    m = PolicyModule(student(), teacher(), init_mode=mode, init_from=None if mode == "only_finetune" else str(ckpt))
    w = window()
    pred = m(w)
    loss = (pred.arm - w.actions[..., :6]).abs().mean() + pred.gripper_logit.mean()
    got = grad_names(m, loss)
    llm = {f"policy.student.backbone.{n}" for n, _ in
           m.policy.student.backbone.named_parameters() if n.startswith(_llm_prefix(m))}
    ours = names_under(m, "policy.student.state_encoder.", "policy.student.action_token", "policy.mapper.",
                       "policy.action_head.")
    expected = ours | (set() if mode == "freeze_vlm" else llm)
    assert got == expected
    vision = {id(p) for v in m.policy.student.backbone.vision_modules() for p in v.parameters()}
    assert all(not p.requires_grad for p in m.parameters() if id(p) in vision)


def _llm_prefix(m):
    backbone = m.policy.student.backbone
    llm = backbone.language_model()
    for name, mod in backbone.named_modules():
        if mod is llm:
            return name + "."
    raise AssertionError("language model not found in backbone")


@pytest.fixture(scope="module")
def smooth_batch():
    """A batch from the (learnable) synthetic datamodule: consecutive actions of smooth trajectories."""
    from datamodules.synthetic import SyntheticWindowDataModule

    dm = SyntheticWindowDataModule(num_episodes=4, episode_length=8, num_steps=2, batch_size=1, val_fraction=0.25)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_stage1_overfits_a_fixed_batch(smooth_batch):
    m1 = DistillationModule(student(), teacher())
    first, last = overfit(m1, lambda: m1.losses(smooth_batch)["loss"], steps=250, lr=3e-3)
    assert last < first / 10, (first, last)


def test_stage2_overfits_a_fixed_batch(smooth_batch):
    from vitavla.losses import action_loss

    w = smooth_batch
    m2 = PolicyModule(student(), teacher(), init_mode="only_finetune")
    first, last = overfit(m2, lambda: action_loss(m2(w), w.actions, w.action_valid, m2.policy.robot)[0],
                          steps=60, lr=3e-3)
    assert last < first / 10, (first, last)


def test_stage1_checkpoint_feeds_stage2_through_lightning(tmp_path):
    from datamodules.synthetic import SyntheticWindowDataModule

    data = SyntheticWindowDataModule(num_episodes=4, episode_length=6, num_steps=3, batch_size=2, val_fraction=0.25)
    m1 = DistillationModule(student(), teacher(), optim=OptimConfig(lr=1e-3))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, limit_val_batches=1, enable_model_summary=False)
    trainer.fit(m1, datamodule=data)
    ckpt = tmp_path / "s1.ckpt"
    trainer.save_checkpoint(ckpt)
    sd = read_state_dict(ckpt)  # weights_only=True inside
    assert set(sd) == {n for n, p in m1.named_parameters() if p.requires_grad}  # slim: trainable only
    m2 = PolicyModule(student(), teacher(), init_mode="two_stage", init_from=str(ckpt))
    assert torch.equal(m2.policy.student.action_token, m1.student.action_token)
    for (k, a), b in zip(m1.mapper.state_dict().items(), m2.policy.mapper.state_dict().values()):
        assert torch.equal(a, b), k
    # the decoder starts from the teacher's
    t = teacher()
    assert torch.equal(m2.policy.action_head.action_decoder[0].weight, t.action_head.action_decoder[0].weight)


def test_mismatched_parts_fail_at_construction_naming_both_sides(tmp_path):
    with pytest.raises(ValueError, match=r"mapper_out_dim=99 .*hidden size 32"):
        DistillationModule(student(), teacher(), mapper_out_dim=99)
    with pytest.raises(ValueError, match=r"student.robot.arm_dim=6 but teacher .*arm_dim=12"):
        DistillationModule(student(), teacher(arm_dim=12, gripper_dim=2))
    with pytest.raises(ValueError, match=r"teacher reads 112px .*224px"):
        DistillationModule(student(), teacher(image_size=112))
    with pytest.raises(ValueError, match="needs init_from"):
        PolicyModule(student(), teacher(), init_mode="two_stage")
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {"student.state_encoder.arm_encoder.weight": torch.zeros(3, 3)}}, bad)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)bad.ckpt.*missing keys .*arm_encoder.weight: expected \(64, 6\), found \(3, 3\)"):
        PolicyModule(student(), teacher(), init_mode="two_stage", init_from=str(bad))


def test_data_whose_robot_differs_fails_before_the_first_step(tmp_path):
    from datamodules.synthetic import SyntheticWindowDataModule

    data = SyntheticWindowDataModule(num_episodes=2, episode_length=6, num_steps=3, batch_size=2,
                                     arm_dim=12, gripper_dim=2)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"data \(SyntheticWindowDataModule\).robot.arm_dim=12 but student"):
        trainer.fit(DistillationModule(student(), teacher()), datamodule=data)


def _fit_three_steps(tmp_path, optim: OptimConfig, precision: str = "32-true"):
    from datamodules.synthetic import SyntheticWindowDataModule

    data = SyntheticWindowDataModule(num_episodes=4, episode_length=6, num_steps=3, batch_size=2, val_fraction=0.25)
    torch.manual_seed(0)
    m = PolicyModule(student(), teacher(), init_mode="only_finetune", optim=optim)
    start = {n: p.detach().clone() for n, p in m.named_parameters()}
    trainer = L.Trainer(max_steps=3, accelerator="cpu", precision=precision, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        limit_val_batches=0, enable_model_summary=False, gradient_clip_val=0.5)
    trainer.fit(m, datamodule=data)
    return m, start, trainer.optimizers[0]


def test_fused_adamw_is_the_cpu_default_and_steps_as_the_per_tensor_loop(tmp_path):
    m, start, opt = _fit_three_steps(tmp_path, OptimConfig(lr=1e-2))
    assert opt.defaults["fused"] is True
    ref, ref_start, ref_opt = _fit_three_steps(tmp_path, OptimConfig(lr=1e-2, fused=False))
    assert not ref_opt.defaults["fused"]
    moved = 0
    for (n, a), b in zip(m.named_parameters(), ref.parameters()):
        assert torch.equal(start[n], ref_start[n]), n
        if a.requires_grad:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=n)
            moved += not torch.equal(a, start[n])
    assert moved > 10  # the steps did train


def test_mixed_precision_with_clipping_keeps_the_unfused_kernel(tmp_path):
    """Lightning refuses gradient clipping with a fused optimizer under mixed precision: auto stays off."""
    from vitavla.modules.common import use_fused_adamw

    m, start, opt = _fit_three_steps(tmp_path, OptimConfig(lr=1e-2), precision="bf16-mixed")
    assert not opt.defaults["fused"]
    assert any(not torch.equal(p, start[n]) for n, p in m.named_parameters())
    cpu, meta = [torch.zeros(1)], [torch.zeros(1, device="meta")]
    assert use_fused_adamw(OptimConfig(), cpu, "32-true") and not use_fused_adamw(OptimConfig(), meta, "32-true")
    assert use_fused_adamw(OptimConfig(fused=True), cpu, "bf16-mixed")
    assert not use_fused_adamw(OptimConfig(fused=False), cpu, "32-true")


@pytest.mark.parametrize("arm_loss,expected", [("mae", 0.0), ("smooth_l1", 1 / 6)])
def test_arm_loss_regresses_median_or_mean_of_labels_that_share_an_observation(arm_loss, expected):
    """Five "hold" labels (0) and one "lift" label (1) at one observation, as a scripted grasp gives a
    one-frame policy: MAE settles on the median (hold, so a closed-loop policy never lifts), smooth L1 on
    the mean (a small lift that leaves the ambiguous state)."""
    from vitavla.action_head import ActionOutput
    from vitavla.batch import RobotSpec
    from vitavla.losses import action_loss

    robot = RobotSpec(arm_dim=1, gripper_dim=1)
    target = torch.tensor([0.0, 0, 0, 0, 0, 1]).view(6, 1, 1, 1).expand(6, 1, 1, 2).clone()
    mask = torch.ones(6, 1, 1, dtype=torch.bool)
    arm = torch.full((1, 1, 1, 1), 0.5, requires_grad=True)
    opt = torch.optim.SGD([arm], lr=0.02)
    for _ in range(1500):
        pred = ActionOutput(arm.expand(6, 1, 1, 1), torch.zeros(6, 1, 1, 1))
        loss, parts = action_loss(pred, target, mask, robot, gripper_weight=0.0, arm_loss=arm_loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert arm.item() == pytest.approx(expected, abs=0.02)
    pred = ActionOutput(arm.detach().expand(6, 1, 1, 1), torch.zeros(6, 1, 1, 1))
    _, parts = action_loss(pred, target, mask, robot, gripper_weight=0.0, arm_loss=arm_loss)
    assert parts["arm_mae"].item() == pytest.approx((5 * abs(arm.item()) + abs(1 - arm.item())) / 6, abs=1e-5)
    with pytest.raises(ValueError, match="arm_loss must be one of"):
        action_loss(pred, target, mask, robot, arm_loss="mse")


def test_policy_module_names_a_bad_arm_loss():
    from vitavla.errors import ConfigError

    with pytest.raises(ConfigError, match=r"arm_loss must be one of \('mae', 'smooth_l1'\), got 'l2'"):
        PolicyModule(student(), teacher(), init_mode="only_finetune", arm_loss="l2")
