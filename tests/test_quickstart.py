"""`vitavla quickstart`: its layered configs, and the whole pipeline at toy scale in the real simulator."""

import json
import math
from pathlib import Path

import pytest
import yaml

from cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "quickstart"


def resolved(capsys, *configs: Path) -> dict:
    args = ["fit"] + [a for c in configs for a in ("--config", str(c))] + ["--print_config"]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("step", ["teacher.yaml", "align.yaml", "finetune.yaml"])
def test_configs_agree_on_robot_images_and_teacher(capsys, step):
    cpu = resolved(capsys, CONFIGS / step)
    gpu = resolved(capsys, CONFIGS / step, CONFIGS / "gpu" / step)
    for cfg, size, steps in ((cpu, 56, 1), (gpu, 224, 7)):
        data = cfg["data"]["init_args"]
        # Seer trains on windows of sequence_length + future_steps (3) frames, the last 3 foresight targets
        # only; the students read the teacher's sequence_length steps.
        window = steps + 3 if step == "teacher.yaml" else steps
        assert (data["image_size"], data["num_steps"], data["gripper_state"]) == (size, window, "width")
        model = cfg["model"]["init_args"]
        teacher = model["teacher"]["init_args"]
        if size == 56:  # the tiny teacher must be built identically by every step (export metadata checks it)
            assert teacher["preset"] == "tiny" and teacher["overrides"]["image_size"] == 56
            assert teacher["overrides"]["sequence_length"] == steps
        else:
            assert teacher["preset"] == "seer_libero" and teacher["overrides"] == {}  # sequence_length 7
        if "student" in model:
            backbone = model["student"]["init_args"]["backbone"]["init_args"]
            assert backbone["image_size"] == size and model["student"]["init_args"]["max_steps"] == steps
    assert gpu["trainer"]["precision"] == "bf16-mixed" and gpu["trainer"]["accelerator"] == "gpu"


@pytest.mark.sim
@pytest.mark.slow
def test_quickstart_runs_every_step_in_libero(tmp_path):
    pytest.importorskip("libero.libero")
    from vitavla.quickstart import main as quickstart

    out = tmp_path / "qs"
    results = quickstart(["--out", str(out), "--demos", "2", "--teacher-steps", "2", "--align-steps", "2",
                          "--finetune-steps", "2", "--episodes", "1", "--max-steps", "3", "--workers", "1",
                          "--render-size", "32", "--batch-size", "4",
                          "--modes", "freeze_vlm", "two_stage", "only_finetune", "--seed", "3"])
    assert list(results) == ["teacher", "two_stage", "only_finetune", "freeze_vlm"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["demos"]["kept"] == 2 and len(list((out / "demos").glob("*_demo.hdf5"))) == 1
    for name, run in summary["runs"].items():
        assert math.isfinite(run["val"]["val/arm_mae"]) and 0 <= run["val"]["val/gripper_acc"] <= 1
        assert run["rollout"]["episodes"] + run["rollout"]["errors"] == 1 and run["rollout"]["errors"] == 0
        assert run["trainable"] > 0 and Path(run["checkpoint"]).is_file()
        assert yaml.safe_load((Path(run["log_dir"]) / "config.yaml").read_text())["seed_everything"] == 3
        assert list((out / f"eval_{name}" / "rollout" / "videos").rglob("*.mp4")), name
    # freeze_vlm trains fewer parameters than the other student modes; the teacher export exists.
    runs = summary["runs"]
    assert runs["freeze_vlm"]["trainable"] < runs["two_stage"]["trainable"] == runs["only_finetune"]["trainable"]
    assert (Path(runs["teacher"]["log_dir"]) / "teacher.safetensors").is_file()
    assert list(out.rglob("events.out.tfevents.*"))
    table = (out / "summary.md").read_text()
    assert "| teacher (Seer, trained here) |" in table and "| student freeze_vlm |" in table


def test_success_cell_gives_rate_wilson_interval_and_counts():
    from vitavla.quickstart import format_success

    assert format_success({"successes": 3, "episodes": 10}) == "0.30 [0.11, 0.60] (3/10)"
    assert format_success({"successes": 0, "episodes": 10, "errors": 1}) == "0.00 [0.00, 0.28] (0/10, 1 errors)"
    assert format_success({"successes": 0, "episodes": 0}) == "n/a (0/0)"
