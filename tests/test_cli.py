"""`vitavla fit` end to end: both stages from the tiny configs, teacher swap by class_path, DeepSpeed, errors."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FAST = ["--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.num_sanity_val_steps=0",
        "--data.init_args.num_episodes=4", "--data.init_args.episode_length=6"]


def fit(config: str, root: Path, *extra: str) -> Path:
    main(["fit", "--config", str(CONFIGS / config), f"--trainer.default_root_dir={root}",
          f"--trainer.logger.init_args.save_dir={root}", *FAST, *extra])
    ckpts = sorted(root.glob("version_*/checkpoints/last.ckpt"))
    assert ckpts, f"no checkpoint under {root}"
    return ckpts[-1]


def test_fit_stage1_then_stage2_from_the_command_line(tmp_path):
    stage1 = fit("tiny_align.yaml", tmp_path / "align")
    sd = torch.load(stage1, map_location="cpu", weights_only=True)["state_dict"]
    assert set(sd) == {"student.action_token", *{k for k in sd if k.startswith(("student.state_encoder.", "mapper."))}}
    assert any(k.startswith("mapper.") for k in sd)
    stage2 = fit("tiny_finetune.yaml", tmp_path / "finetune", f"--model.init_args.init_from={stage1}")
    sd2 = torch.load(stage2, map_location="cpu", weights_only=True)["state_dict"]
    assert any(".language_model." in k for k in sd2) and any(k.startswith("policy.action_head.") for k in sd2)
    assert not any("vision_tower" in k for k in sd2)  # frozen weights come from the config, not the ckpt


def test_teacher_is_swapped_by_class_path_alone(tmp_path):
    override = tmp_path / "teacher.yaml"
    override.write_text(
        "model:\n  init_args:\n    teacher:\n      class_path: teachers.TransformerTeacher\n"
        "      init_args: {hidden_size: 48, num_layers: 1, max_steps: 8}\n")
    ckpt = fit("tiny_align.yaml", tmp_path / "align", "--config", str(override))
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert sd["mapper.net.4.weight"].shape[0] == 48  # the mapper now targets the new teacher's width


@pytest.mark.deepspeed
def test_deepspeed_stage_2_runs_a_step_on_cpu(tmp_path):
    pytest.importorskip("deepspeed")
    main(["fit", "--config", str(CONFIGS / "tiny_align.yaml"), f"--trainer.default_root_dir={tmp_path}",
          f"--trainer.logger.init_args.save_dir={tmp_path}", *FAST, "--trainer.max_steps=1",
          "--trainer.strategy=deepspeed_stage_2"])
    assert list(tmp_path.glob("version_*/checkpoints/*.ckpt"))


def test_inconsistent_config_fails_with_one_clear_message(tmp_path):
    with pytest.raises(SystemExit, match=r"mapper_out_dim=99 but the teacher \(SeerTeacher\) has hidden size"):
        main(["fit", "--config", str(CONFIGS / "tiny_align.yaml"), f"--trainer.default_root_dir={tmp_path}",
              "--model.init_args.mapper_out_dim=99", *FAST])
    with pytest.raises(SystemExit, match="checkpoint not found: .*missing.ckpt"):
        main(["fit", "--config", str(CONFIGS / "tiny_finetune.yaml"), f"--trainer.default_root_dir={tmp_path}",
              f"--model.init_args.init_from={tmp_path / 'missing.ckpt'}", *FAST])


SCRIPT = shutil.which("vitavla", path=str(Path(sys.executable).parent)) or shutil.which("vitavla")


@pytest.mark.skipif(SCRIPT is None, reason="console script not installed")
def test_console_script_help_shows_field_docs():
    out = subprocess.run([SCRIPT, "fit", "--model.help", "vitavla.modules.DistillationModule", "--model.optim.help"],
                         capture_output=True, text=True, timeout=120, executable=None)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Peak learning rate" in out.stdout  # OptimConfig field docstring


def test_paper_configs_parse():
    from cli import build_cli

    for name in ("align_calvin", "finetune_calvin", "align_libero", "finetune_libero"):
        with pytest.raises(SystemExit) as e:
            build_cli(["fit", "--config", str(CONFIGS / f"{name}.yaml"), "--print_config"], run=True)
        assert e.value.code in (0, None), name


def test_eval_configs_parse():
    from cli import build_cli

    for name in ("eval_libero", "eval_tiny"):
        with pytest.raises(SystemExit) as e:
            build_cli(["test", "--config", str(CONFIGS / f"{name}.yaml"), "--print_config"], run=True)
        assert e.value.code in (0, None), name
