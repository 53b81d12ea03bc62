"""``precision: bf16-mixed`` on CPU through both stages and streaming inference, with the tolerances
docs/memory.md states: losses within 1% of float32 (measured 1e-4 / 3e-4 relative on the tiny student),
streamed actions within 1e-2 (measured 1.3e-3). Master weights and checkpoints stay float32."""

import pytest
import torch
import yaml

from tests.conftest import ONLY_FINETUNE, fit, tiny_policy, window
from tests.vitavla.conftest import overfit, student, teacher
from vitavla.checkpoint_io import read_state_dict
from vitavla.losses import action_loss
from vitavla.modules import DistillationModule, PolicyModule
from vitavla.observation import Observation
from vitavla.streaming import StreamingPolicy

LOSS_RTOL = 1e-2
ACTION_ATOL = 1e-2


@pytest.fixture(scope="module")
def batch():
    from datamodules.synthetic import SyntheticWindowDataModule

    dm = SyntheticWindowDataModule(num_episodes=4, episode_length=8, num_steps=2, batch_size=2, val_fraction=0.25)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def bf16(fn):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fn()


def test_stage_losses_under_bf16_autocast_match_float32(batch):
    m1 = DistillationModule(student(), teacher())
    m2 = PolicyModule(student(), teacher(), init_mode="only_finetune")
    losses = {"stage 1": lambda: m1.losses(batch)["loss"],
              "stage 2": lambda: action_loss(m2(batch), batch.actions, batch.action_valid, m2.policy.robot)[0]}
    for name, loss in losses.items():
        full, mixed = loss(), bf16(loss)
        assert torch.isfinite(mixed), name
        assert mixed.item() == pytest.approx(full.item(), rel=LOSS_RTOL), name


def test_stage2_learns_under_bf16_autocast(batch):
    m2 = PolicyModule(student(), teacher(), init_mode="only_finetune")
    first, last = overfit(m2, lambda: bf16(lambda: action_loss(m2(batch), batch.actions, batch.action_valid,
                                                                m2.policy.robot)[0]), steps=60, lr=3e-3)
    assert last < first / 5, (first, last)
    assert all(p.dtype == torch.float32 for p in m2.parameters())  # autocast leaves the master weights alone


def test_bf16_mixed_fit_of_both_stages_records_precision_and_attention_and_keeps_fp32_checkpoints(tmp_path):
    s1 = fit("tiny_align.yaml", tmp_path / "s1", "--trainer.precision=bf16-mixed")
    s2 = fit("tiny_finetune.yaml", tmp_path / "s2", "--trainer.precision=bf16-mixed",
             "--model.init_args.init_mode=two_stage", f"--model.init_args.init_from={s1}")
    for ckpt in (s1, s2):
        state = read_state_dict(ckpt)
        assert state and all(t.dtype == torch.float32 for t in state.values() if t.is_floating_point())
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    config = yaml.safe_load(next((tmp_path / "s2").glob("version_*/config.yaml")).read_text())
    assert config["trainer"]["precision"] == "bf16-mixed"
    backbone = config["model"]["init_args"]["student"]["init_args"]["backbone"]["init_args"]
    assert backbone["attn_implementation"] == "sdpa"  # chosen by config, recorded with the run
    # The same run with eager attention: recorded as chosen.
    fit("tiny_finetune.yaml", tmp_path / "eager", *ONLY_FINETUNE,
        "--model.init_args.student.init_args.backbone.init_args.attn_implementation=eager")
    eager = yaml.safe_load(next((tmp_path / "eager").glob("version_*/config.yaml")).read_text())
    assert eager["model"]["init_args"]["student"]["init_args"]["backbone"]["init_args"][
        "attn_implementation"] == "eager"


def test_streaming_inference_under_bf16_autocast_stays_within_tolerance():
    policy = tiny_policy("internvl").eval()
    w = window(num_steps=4)
    full, mixed = StreamingPolicy(policy), StreamingPolicy(policy)
    with torch.no_grad():
        for t in range(4):
            obs = Observation(images=w.images[:, t], state=w.state[:, t], instruction=w.instruction)
            a, b = full.step(obs), bf16(lambda: mixed.step(obs))
            torch.testing.assert_close(b.arm.float(), a.arm, atol=ACTION_ATOL, rtol=0)
            torch.testing.assert_close(b.gripper_logit.float(), a.gripper_logit, atol=ACTION_ATOL, rtol=0)
