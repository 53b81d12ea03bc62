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
                          "--render-size", "32", "--batch-size", "4", "--jobs", "1",  # in this process
                          "--modes", "freeze_vlm", "two_stage", "only_finetune", "two_stage_lora", "--seed", "3"])
    assert list(results) == ["teacher", "two_stage", "only_finetune", "freeze_vlm", "two_stage_lora"]
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
    # LoRA: the heads of freeze_vlm plus the adapters, far fewer than the whole LLM
    assert runs["freeze_vlm"]["trainable"] < runs["two_stage_lora"]["trainable"] < runs["two_stage"]["trainable"]
    assert (Path(runs["teacher"]["log_dir"]) / "teacher.safetensors").is_file()
    assert list(out.rglob("events.out.tfevents.*"))
    table = (out / "summary.md").read_text()
    assert "| teacher (Seer, trained here) |" in table and "| student freeze_vlm |" in table


def test_success_cell_gives_rate_wilson_interval_and_counts():
    from vitavla.quickstart import format_success

    assert format_success({"successes": 3, "episodes": 10}) == "0.30 [0.11, 0.60] (3/10)"
    assert format_success({"successes": 0, "episodes": 10, "errors": 1}) == "0.00 [0.00, 0.28] (0/10, 1 errors)"
    assert format_success({"successes": 0, "episodes": 0}) == "n/a (0/0)"


def test_lora_variant_layers_adapters_over_stage2(capsys):
    pytest.importorskip("peft")
    cfg = resolved(capsys, CONFIGS / "finetune.yaml", CONFIGS / "finetune_lora.yaml")
    lora = cfg["model"]["init_args"]["lora"]
    assert (lora["rank"], lora["alpha"]) == (8, 16) and "q_proj" in lora["target_modules"]
    # everything else is finetune.yaml's: same student, same teacher, same data
    base = resolved(capsys, CONFIGS / "finetune.yaml")
    cfg["model"]["init_args"].pop("lora"), base["model"]["init_args"].pop("lora")
    assert cfg["model"] == base["model"] and cfg["data"] == base["data"]


@pytest.mark.parametrize("modes, stage1, runs", [
    (["only_finetune"], False, [("only_finetune", "only_finetune", "null", False)]),
    (["two_stage_lora", "only_finetune"], True, [("only_finetune", "only_finetune", "null", False),
                                                 ("two_stage_lora", "two_stage", "ALIGN", True)]),
])
def test_train_runs_stage1_only_when_a_mode_starts_from_it(monkeypatch, tmp_path, modes, stage1, runs):
    pytest.importorskip("peft")
    from vitavla import quickstart as qs

    fits = []

    def fake_fit(configs, run_dir, name, steps, overrides, curve_every=0):
        fits.append((name, [Path(c).name for c in configs], overrides))
        log_dir = tmp_path / name
        log_dir.mkdir(exist_ok=True)
        (log_dir / "teacher.safetensors").write_bytes(b"")
        return qs.RunResult(name, "ALIGN" if name == "align" else f"{name}.ckpt", str(log_dir), 1, 0.0, {})

    monkeypatch.setattr(qs, "_fit", fake_fit)
    # --jobs 1: the jobs run in this process, where the fake _fit is
    args, layered = qs.parse(qs.build_parser(), ["--out", str(tmp_path), "--modes", *modes, "--jobs", "1"])
    demos = qs.Demos(tmp_path / "demos", 20, 20, False, 0.0)
    results, align, _ = qs.pipeline(args, tmp_path, layered, demos, seed=0, rollouts=False)
    assert (align is not None) == stage1 and [f[0] == "align" for f in fits].count(True) == int(stage1)
    assert list(results) == ["teacher"] + [r[0] for r in runs]
    for name, init_mode, init_from, lora in runs:
        _, configs, overrides = next(f for f in fits if f[0] == name)
        assert f"--model.init_args.init_mode={init_mode}" in overrides
        assert f"--model.init_args.init_from={init_from}" in overrides
        assert configs == ["finetune.yaml"] + (["finetune_lora.yaml"] if lora else [])


def test_seeds_planned_together_share_the_first_seeds_teacher(monkeypatch, tmp_path):
    # vitavla evidence runs every seed's jobs as one set: later seeds wait for seed 0's teacher job, not a file
    from vitavla import quickstart as qs

    fits = []

    def fake_fit(configs, run_dir, name, steps, overrides, curve_every=0):
        fits.append((run_dir.parent.name, name, overrides))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "teacher.safetensors").write_bytes(b"")
        return qs.RunResult(name, f"{run_dir}/{name}.ckpt", str(run_dir), 1, 0.0, {})

    monkeypatch.setattr(qs, "_fit", fake_fit)
    args, layered = qs.parse(qs.build_parser(), ["--out", str(tmp_path), "--modes", "two_stage", "--jobs", "1"])
    demos = qs.Demos(tmp_path / "demos", 20, 20, False, 0.0)
    first = qs.plan(args, tmp_path / "seed0", layered, demos, 0, rollouts=False, ns="seed0/")
    second = qs.plan(args, tmp_path / "seed1", layered, demos, 1, rollouts=False, teacher_run="seed0/teacher",
                     ns="seed1/")
    assert [j.name for j in second.jobs] == ["seed1/align", "seed1/two_stage"]
    assert all("seed0/teacher" in j.deps for j in second.jobs)
    finished = []
    done = qs.run_plans([first, second], 1, on_done=lambda name, so_far: finished.append(name))
    assert finished == ["seed0/teacher", "seed0/align", "seed0/two_stage", "seed1/align", "seed1/two_stage"]
    results0, align0, _ = first.collect(done)
    results1, align1, overrides1 = second.collect(done)
    assert list(results0) == ["teacher", "two_stage"] and list(results1) == ["two_stage"]
    assert align1.log_dir == str(tmp_path / "seed1" / "align") != align0.log_dir
    teacher = f"--model.init_args.teacher.init_args.checkpoint={tmp_path / 'seed0' / 'teacher' / 'teacher.safetensors'}"
    assert overrides1 == [teacher]
    assert all(teacher in o for seed, name, o in fits if seed == "seed1")
    assert "--seed_everything=1" in next(o for seed, name, o in fits if (seed, name) == ("seed1", "two_stage"))


def test_trainings_draw_progress_bars_unless_two_can_run_at_once():
    from vitavla import quickstart as qs

    assert qs.training_bars(2, ["two_stage"]) and qs.training_bars(1, ["two_stage", "only_finetune"])
    assert not qs.training_bars(2, ["two_stage", "only_finetune"])


@pytest.mark.parametrize("argv, steps", [([], 3000), (["--tasks", "0", "1"], 6000), (["--tasks", "0", "1", "--teacher-steps", "50"], 50)])
def test_teacher_steps_default_to_a_fixed_budget_per_task(tmp_path, argv, steps):
    # Two tasks at the one-task budget halve the passes over each task's demos (task 0: 11/15 -> 3/15).
    from vitavla import quickstart as qs

    args, _ = qs.parse(qs.build_parser(), ["--out", str(tmp_path), *argv])
    assert args.teacher_steps == steps


def test_record_demos_hands_the_expert_options_to_the_generator(monkeypatch, tmp_path):
    from vitavla import quickstart as qs
    from vitavla.demos import libero_hdf5, libero_scripted

    seen = []

    def fake_generate(cfg):
        seen.append(cfg)
        return [libero_scripted.TaskResult(t, tmp_path / f"{t}.hdf5", cfg.episodes, cfg.episodes, [], [])
                for t in cfg.tasks]

    monkeypatch.setattr(libero_scripted, "generate", fake_generate)
    monkeypatch.setattr(libero_hdf5, "existing_demos", lambda path: (20, 23))
    args, _ = qs.parse(qs.build_parser(), ["--out", str(tmp_path), "--tasks", "0", "1", "--descend-xy-gain", "3",
                                           "--xy-tolerance", "0.004", "--noise", "0.2", "--start-offset", "0.05"])
    demos = qs.record_demos(args, tmp_path)
    (cfg,) = seen
    assert (cfg.tasks, cfg.descend_xy_gain, cfg.xy_tolerance, cfg.noise, cfg.start_offset) == ((0, 1), 3.0, 0.004,
                                                                                               0.2, 0.05)
    assert (demos.kept, demos.attempts_used) == (20, 23)
