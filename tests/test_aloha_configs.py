"""The ALOHA pipeline configs agree: teacher_aloha.yaml (bimanual Seer) -> align_aloha.yaml (stage 1) ->
finetune_aloha.yaml (stage 2) -> eval_aloha.yaml (gym-aloha). They parse without weights, share one student
and one teacher block, the student's history is the teacher's S, the training data is the teacher's apart from
the window length, and the robot they name is the one AlohaDataModule(arms: both) yields."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from cli import build_cli
from teachers import SeerConfig, SeerTeacher
from teachers.seer.teacher import robot_spec
from vitavla.batch import RobotSpec

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STUDENT_CONFIGS = ("align_aloha", "finetune_aloha", "eval_aloha")
# AlohaDataModule(arms="both"): 12 joints, then the left and right gripper widths as recorded.
ALOHA = RobotSpec(arm_dim=12, gripper_dim=2, gripper_state="width", gripper_state_dim=2)
SEER_FUTURE_STEPS = 3  # Seer's window_size = sequence_length + 3 (foresight target of step t is frame t + 3)


def load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def model_args(name: str) -> dict:
    return load(name)["model"]["init_args"]


def seer_config(teacher: dict) -> SeerConfig:
    args = teacher["init_args"]
    return SeerConfig.preset(args["preset"], **args.get("overrides", {}))


@pytest.mark.parametrize("name", ["align_aloha", "finetune_aloha"])
def test_training_configs_parse(name):
    # --print_config parses and validates without instantiating: no weights or dataset needed.
    with pytest.raises(SystemExit) as e:
        build_cli(["fit", "--config", str(CONFIGS / f"{name}.yaml"), "--print_config"], run=True)
    assert e.value.code in (0, None), name


def test_stages_are_the_paper_modules_chained_by_their_checkpoints():
    align, finetune, ev = (load(n)["model"] for n in STUDENT_CONFIGS)
    assert align["class_path"] == "vitavla.modules.DistillationModule"
    assert finetune["class_path"] == ev["class_path"] == "vitavla.modules.PolicyModule"
    ft = finetune["init_args"]
    assert ft["init_mode"] == "two_stage"
    align_root = load("align_aloha")["trainer"]["default_root_dir"]
    assert ft["init_from"] == f"{align_root}/version_0/checkpoints/last.ckpt"
    assert ev["init_args"]["init_mode"] == "only_finetune" and ev["init_args"]["init_from"] is None
    teacher_run = load("teacher_aloha")
    export_path = teacher_run["model"]["init_args"]["export_path"]
    export = f"{teacher_run['trainer']['default_root_dir']}/version_0/{export_path}"
    assert align["init_args"]["teacher"]["init_args"]["checkpoint"] == export
    assert "runs/finetune_aloha/version_0/checkpoints/last.ckpt" in (CONFIGS / "eval_aloha.yaml").read_text()


def test_student_and_teacher_blocks_are_shared_and_the_teacher_is_teacher_alohas():
    blocks = {n: model_args(n) for n in STUDENT_CONFIGS}
    align = blocks["align_aloha"]
    for name, args in blocks.items():
        assert args["student"] == align["student"], f"{name}: student block differs from align_aloha's"
        assert args["teacher"] == align["teacher"], f"{name}: teacher block differs from align_aloha's"
    trained = model_args("teacher_aloha")["teacher"]
    used = align["teacher"]
    assert "checkpoint" not in trained["init_args"]  # teacher_aloha trains from scratch
    assert used["class_path"] == trained["class_path"] == "teachers.SeerTeacher"
    assert {k: v for k, v in used["init_args"].items() if k != "checkpoint"} == trained["init_args"]


def test_student_history_is_the_teachers_sequence_length_and_windows_follow():
    s = model_args("align_aloha")["student"]["init_args"]
    seq = seer_config(model_args("align_aloha")["teacher"]).sequence_length
    assert seq == 7  # seer_libero's S: Seer's real-robot history
    # DistillationModule / PolicyModule refuse a student history longer than the teacher's; shorter would
    # align against a teacher that never saw the steps it was trained on.
    assert s["max_steps"] == seq
    for name in ("align_aloha", "finetune_aloha"):
        assert load(name)["data"]["init_args"]["num_steps"] == seq, name
    assert load("teacher_aloha")["data"]["init_args"]["num_steps"] == seq + SEER_FUTURE_STEPS


def test_training_data_is_the_teachers_apart_from_window_length_and_batch_size():
    teacher_data = load("teacher_aloha")["data"]
    # Paper Table 5: per-GPU batch 8 for alignment, 4 for fine-tuning (the teacher's 16 is Seer's).
    for name, batch in (("align_aloha", 8), ("finetune_aloha", 4)):
        data = load(name)["data"]
        assert data["class_path"] == teacher_data["class_path"] == "datamodules.AlohaDataModule"
        differ = {k for k in {*data["init_args"], *teacher_data["init_args"]}
                  if data["init_args"].get(k) != teacher_data["init_args"].get(k)}
        assert differ == {"num_steps", "batch_size"}, (name, differ)
        assert data["init_args"]["batch_size"] == batch


def test_default_instruction_is_the_sim_tasks():
    """Episodes without their own instruction get the wording AlohaSimEnv gives the student at test time."""
    from vitavla.rollout.aloha_env import TASKS

    task = load("eval_aloha")["data"]["init_args"]["env"]["init_args"]["task"]
    for name in ("teacher_aloha", "align_aloha", "finetune_aloha"):
        assert load(name)["data"]["init_args"]["instruction"] == TASKS[task][1], name


def test_robot_of_student_teacher_and_data_is_alohas_both_arms(tmp_path, one_thread):
    """The robot named by the configs is the one AlohaDataModule(arms: both) yields, and a stage-1 module
    built from the config's student block and the teacher's overrides (tiny sizes, no weights) aligns on
    the config's windows."""
    from datamodules import AlohaDataModule
    from tests.conftest import write_dataset
    from vitavla.backbones.internvl import InternVLBackbone
    from vitavla.modules import DistillationModule
    from vitavla.student import VLAStudent

    args = model_args("align_aloha")
    s, teacher = dict(args["student"]["init_args"]), args["teacher"]
    overrides = teacher["init_args"]["overrides"]
    student_robot = RobotSpec(s["arm_dim"], s["gripper_dim"], s["gripper_state"], s["gripper_state_dim"],
                              s["action_chunk"])

    write_dataset(tmp_path / "episodes", lengths=(9, 10), ids=(0, 1))
    small = {"root": str(tmp_path / "episodes"), "num_workers": 0, "stats_cache_dir": str(tmp_path / "cache"),
             "val_fraction": 0.0, "batch_size": 2}
    dm = AlohaDataModule(**{**load("align_aloha")["data"]["init_args"], **small})
    dm.setup("fit")

    # The released preset needs the MAE and CLIP files: its config gives the robot; the tiny preset with the
    # same overrides (and seer_libero's S) is built for real.
    real = seer_config(teacher)
    tiny = SeerTeacher("tiny", overrides={**overrides, "sequence_length": real.sequence_length}, seed=0)
    assert dm.robot == ALOHA == student_robot == robot_spec(real) == tiny.robot

    image_size = s.pop("backbone")["init_args"]["image_size"]
    backbone = InternVLBackbone(path="tiny", tokens_per_image=4, image_size=image_size)
    module = DistillationModule(VLAStudent(backbone, **s), tiny)  # checks robot, chunk, history, image size
    batch = next(iter(dm.train_dataloader()))
    assert batch.state.shape[1:] == (real.sequence_length, ALOHA.state_dim)
    assert batch.actions.shape[2:] == (ALOHA.action_chunk, ALOHA.action_dim)
    with torch.no_grad():
        out = module.losses(batch)
    assert torch.isfinite(out["loss"]) and out["target_rms"] > 0
