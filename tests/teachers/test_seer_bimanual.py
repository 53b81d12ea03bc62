"""Seer sized for other robots by SeerConfig (arm_dim, gripper_dim, gripper_state_dim): a bimanual ALOHA Seer
(12 arm joints + 2 grippers, one width per gripper) on the tiny preset."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from teachers import SeerConfig, SeerTeacher
from teachers.seer import CheckpointMismatchError, SeerModel
from teachers.seer.teacher import robot_spec
from vitavla.batch import RobotSpec, fake_window

# AlohaDataModule(arms="both"): 12 joints, then the left and right gripper widths as recorded.
ALOHA = RobotSpec(arm_dim=12, gripper_dim=2, gripper_state="width", gripper_state_dim=2)
BIMANUAL = {"arm_dim": 12, "gripper_dim": 2, "gripper_width": True, "gripper_state_dim": 2}
# 96 px images (9 patches of 32 px) keep the tests fast on a shared CPU.
SMALL = {"image_size": 96}


def shapes_of(cfg: SeerConfig) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in SeerModel(cfg).state_dict().items()}


@pytest.fixture(scope="module")
def window():
    return fake_window(ALOHA, batch_size=2, num_steps=5, image_size=96)


def test_defaults_keep_the_official_robot_shapes():
    shapes = shapes_of(SeerConfig.preset("tiny"))
    assert shapes["gripper_state_encoder.weight"] == (32, 2)
    assert shapes["gripper_action_decoder.0.weight"] == (1, 16)
    assert shapes["action_gripper_position_encoder.weight"] == (32, 2)
    assert shapes["recon_gripper_state_decoder.0.weight"] == (1, 16)
    libero = SeerConfig.preset("seer_libero")
    assert (libero.gripper_state_values, libero.gripper_features) == (2, 2)
    calvin = SeerConfig.preset("seer_calvin")
    assert (calvin.gripper_state_values, calvin.gripper_features) == (1, 2)


def test_bimanual_model_is_sized_by_the_config():
    shapes = shapes_of(SeerConfig.preset("tiny", **BIMANUAL))
    assert shapes["arm_state_encoder.weight"] == (32, 12)
    assert shapes["gripper_state_encoder.weight"] == (32, 2)
    assert shapes["arm_action_decoder.0.weight"] == (12, 16)
    assert shapes["gripper_action_decoder.0.weight"] == (2, 16)
    # Binary bimanual: one value per gripper in the state, one-hot pairs into the encoder.
    binary = SeerConfig.preset("tiny", arm_dim=12, gripper_dim=2)
    assert (binary.gripper_state_values, binary.gripper_features) == (2, 4)


@pytest.mark.parametrize("overrides,message", [
    ({"arm_dim": 0}, r"SeerConfig.arm_dim must be >= 1, got 0"),
    ({"gripper_dim": 0}, r"SeerConfig.gripper_dim must be >= 1, got 0"),
    ({"gripper_dim": 2, "gripper_state_dim": 4}, r"gripper_state_dim=4 does not fit binary grippers.*"
                                                  r"gripper_dim=2 or None"),
    ({"gripper_dim": 2, "gripper_width": True, "gripper_state_dim": 3},
     r"gripper_state_dim=3 must be a positive multiple of gripper_dim=2"),
])
def test_config_validation_names_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        SeerConfig.preset("tiny", **overrides)


def test_robot_follows_the_config():
    assert SeerTeacher("tiny", overrides={**BIMANUAL, **SMALL}).robot == ALOHA
    assert robot_spec(SeerConfig.preset("seer_calvin")) == RobotSpec()  # CALVIN's robot, unchanged
    libero = RobotSpec(gripper_state="width", gripper_state_dim=2)
    assert robot_spec(SeerConfig.preset("seer_libero")) == libero
    binary = robot_spec(SeerConfig.preset("tiny", arm_dim=12, gripper_dim=2))
    assert binary == RobotSpec(arm_dim=12, gripper_dim=2) and binary.state_dim == 14
    assert robot_spec(SeerConfig.preset("tiny", action_pred_steps=2)).action_chunk == 2


def test_bimanual_forward_shapes(window):
    teacher = SeerTeacher("tiny", overrides={**BIMANUAL, **SMALL}).eval()
    with torch.no_grad():
        out = teacher(window)
    assert out.action_query_hidden.shape == (2, 5, 3, 32)
    assert out.arm.shape == (2, 5, 3, 12) and out.gripper_logit.shape == (2, 5, 3, 2)
    assert out.arm.abs().max() <= 1


def test_binary_bimanual_state_rule_matches_robot_spec():
    """Seer's own one-hot (per gripper, in gripper order) equals what the teacher feeds from RobotSpec."""
    teacher = SeerTeacher("tiny", overrides={"arm_dim": 12, "gripper_dim": 2, **SMALL})
    state = torch.zeros(1, 3, 14)
    state[0, :, 12:] = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    _, ours = teacher.model.split_state(state)
    _, spec = teacher.robot.split_state(state)
    assert ours[0].tolist() == [[1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1]]
    assert torch.equal(ours, spec)
    with pytest.raises(ValueError, match=r"takes a 14-D state \(arm 12 \+ gripper 2\)"):
        teacher.model.split_state(torch.zeros(1, 3, 13))


def test_bimanual_loss_is_bce_over_both_grippers_and_falls(window, one_thread):
    torch.manual_seed(0)
    teacher = SeerTeacher("tiny", overrides={**BIMANUAL, **SMALL}).eval()
    with torch.no_grad():
        loss0, parts0 = teacher.training_loss(window)
        out = teacher.predict(window)
    grip = F.binary_cross_entropy_with_logits(out.gripper_logit, window.actions[..., 12:])
    torch.testing.assert_close(parts0["gripper"], grip, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts0["arm"], F.smooth_l1_loss(out.arm, window.actions[..., :12]))
    opt = torch.optim.AdamW([p for p in teacher.parameters() if p.requires_grad], lr=3e-3, weight_decay=1e-4)
    teacher.train()
    for _ in range(20):
        opt.zero_grad()
        teacher.training_loss(window)[0].backward()
        opt.step()
    teacher.eval()
    with torch.no_grad():
        loss1, parts1 = teacher.training_loss(window)
    # Measured: total 0.37 -> 0.25, arm 0.26 -> 0.14, gripper 0.73 -> 0.66 (dropout and shifts in train mode).
    assert loss1 < 0.8 * loss0, (loss0, loss1)
    assert parts1["arm"] < 0.7 * parts0["arm"] and parts1["gripper"] < parts0["gripper"], (parts0, parts1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    teacher = SeerTeacher("tiny", overrides={**BIMANUAL, **SMALL})
    with torch.no_grad():  # move the head away from its initialisation so that a load that missed it shows
        teacher.model.gripper_action_decoder[0].bias.add_(0.5)
    return teacher.eval(), teacher.export(tmp_path_factory.mktemp("bimanual") / "teacher.safetensors")


def test_bimanual_export_round_trips(exported, window):
    teacher, path = exported
    loaded = SeerTeacher("tiny", checkpoint=str(path), overrides={**BIMANUAL, **SMALL}, seed=0).eval()
    with torch.no_grad():
        a, b = teacher(window, predict_images=True), loaded(window, predict_images=True)
    for field in ("action_query_hidden", "arm", "gripper_logit", "image_pred"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_loading_into_another_robot_names_the_head_keys_and_shapes(exported):
    _, path = exported
    with pytest.raises(CheckpointMismatchError) as e:
        SeerTeacher("tiny", checkpoint=str(path), overrides=SMALL)
    msg = str(e.value)
    assert "gripper_action_decoder.0.weight is (2, 16) in the checkpoint but (1, 16) for this config" in msg
    assert "2 gripper outputs, SeerConfig(gripper_dim=1) gives 1" in msg
    assert "arm_action_decoder.0.weight is (12, 16) in the checkpoint but (6, 16)" in msg
    assert "arm_state_encoder.weight is (32, 12) in the checkpoint but (32, 6)" in msg
    # Same head, another state convention: only the encoder is named.
    with pytest.raises(CheckpointMismatchError, match=r"gripper_state_encoder.weight is \(32, 2\) in the "
                                                      r"checkpoint but \(32, 4\).*gripper_width=False"):
        SeerTeacher("tiny", checkpoint=str(path), overrides={"arm_dim": 12, "gripper_dim": 2, **SMALL})


def test_teacher_aloha_config_builds_a_seer_for_the_aloha_datamodules_robot(tmp_path):
    """configs/teacher_aloha.yaml: its Seer reports the robot AlohaDataModule(arms: both) yields, which
    TeacherModule.setup() compares."""
    from pathlib import Path

    import yaml

    from datamodules import AlohaDataModule
    from tests.conftest import write_dataset

    cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "teacher_aloha.yaml").read_text())
    teacher, data = cfg["model"]["init_args"]["teacher"], cfg["data"]
    assert teacher["class_path"] == "teachers.SeerTeacher"
    assert data["class_path"] == "datamodules.AlohaDataModule"
    args = teacher["init_args"]
    write_dataset(tmp_path / "episodes", lengths=(12, 13), ids=(0, 1))
    small = {"root": str(tmp_path / "episodes"), "num_workers": 0, "image_size": 32,
             "stats_cache_dir": str(tmp_path / "cache"), "val_fraction": 0.0}
    dm = AlohaDataModule(**{**data["init_args"], **small})
    dm.setup("fit")
    assert dm.robot == ALOHA
    # The released preset needs the MAE and CLIP files: check its config, and the teacher itself on the tiny
    # preset with the same overrides.
    robot = robot_spec(SeerConfig.preset(args["preset"], **args["overrides"]))
    robot.check_compatible(dm.robot, "teacher_aloha's SeerTeacher", "AlohaDataModule")
    assert robot == dm.robot == SeerTeacher("tiny", overrides={**args["overrides"], **SMALL}).robot
