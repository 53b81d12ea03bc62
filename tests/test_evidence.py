"""`vitavla evidence`: aggregation over seeds, the ordering verdict, learning curves, and the whole run at toy
scale in the real simulator."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitavla.evidence import aggregate, curve_series, mean_std, verdict, write_curves
from vitavla.plots import SERIES_COLORS


def run(successes: int, episodes: int = 10, mae: float = 0.1, curve=()):
    return {"rollout": {"successes": successes, "episodes": episodes}, "val": {"val/arm_mae": mae},
            "curve": [{"step": s, "val": {"val/arm_mae": m}, "rollout": {"successes": w, "episodes": 10}}
                      for s, m, w in curve]}


def per_seed():
    # Three seeds; two_stage clearly above only_finetune, which is about freeze_vlm's level.
    table = {"teacher": [9, 8, 9], "two_stage": [8, 8, 7], "only_finetune": [2, 3, 1], "freeze_vlm": [1, 3, 2]}
    out = {}
    for i, seed in enumerate((0, 1, 2)):
        out[seed] = {p: run(v[i], mae=0.05 * (i + 1)) for p, v in table.items()}
        out[seed]["two_stage"]["curve"] = run(0, curve=[(100, 0.3, 2), (200, 0.2, 6 + i)])["curve"]
        out[seed]["only_finetune"]["curve"] = run(0, curve=[(100, 0.5, 0), (200, 0.4, i)])["curve"]
    return out


def test_mean_std_and_aggregate_over_seeds():
    assert mean_std([0.8, 0.8, 0.7]) == pytest.approx((0.7666667, 0.0577350), abs=1e-6)
    assert mean_std([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError):
        mean_std([])
    agg = aggregate(per_seed())
    assert list(agg) == ["teacher", "two_stage", "only_finetune", "freeze_vlm"]
    assert agg["two_stage"]["success"] == [0.8, 0.8, 0.7] and agg["two_stage"]["seeds"] == [0, 1, 2]
    assert agg["only_finetune"]["mean"] == pytest.approx(0.2) and agg["only_finetune"]["std"] == pytest.approx(0.1)
    assert agg["teacher"]["arm_mae_mean"] == pytest.approx(0.1) and agg["freeze_vlm"]["episodes"] == [10] * 3
    # A shared teacher that seed 1 trained (`--seeds 1`, then `--seeds 0 1`) is still found, under its own seed.
    later = aggregate({0: {"two_stage": run(7)}, 1: {"teacher": run(9), "two_stage": run(8)}})
    assert later["teacher"]["seeds"] == [1] and later["teacher"]["successes"] == [9]
    assert later["two_stage"]["seeds"] == [0, 1]


def test_verdict_says_whether_the_ordering_holds_beyond_seed_noise():
    lines = verdict(aggregate(per_seed()))
    assert lines[0] == "two_stage is 10 points below the teacher (within the 10-point target)."
    # 0.767 - 0.2 over SE sqrt(0.0577^2/3 + 0.1^2/3) = 0.0667: 8.5 SE.
    assert lines[1] == ("two_stage >= only_finetune: holds (difference +57 points; 8.5 standard errors, beyond "
                        "seed noise).")
    assert lines[2] == ("only_finetune > freeze_vlm: does not hold (difference +0 points; 0.0 standard errors, "
                        "within seed noise).")
    one = aggregate({0: {"two_stage": run(3), "only_finetune": run(5)}})
    assert verdict(one) == ["two_stage >= only_finetune: does not hold (difference -20 points; one seed, so no "
                            "estimate of seed noise)."]
    above = verdict(aggregate({0: {"teacher": run(6), "two_stage": run(8)}}))
    assert above == ["two_stage is 20 points above the teacher (within the 10-point target)."]


def test_summary_gives_a_shared_teacher_its_interval_and_students_their_spread():
    import argparse

    from vitavla.evidence import format_summary

    runs = per_seed()
    for seed in (1, 2):
        del runs[seed]["teacher"]  # one teacher, trained with the first seed, serves every seed
    agg = aggregate(runs)
    assert agg["teacher"]["seeds"] == [0] and agg["two_stage"]["seeds"] == [0, 1, 2]
    args = argparse.Namespace(suite="libero_object", tasks=[0, 3], demos=20, episodes=5)
    table = format_summary(agg, verdict(agg), args, 12.0)
    assert table.startswith("Evidence run: suite libero_object, tasks [0, 3], 20 demos per task, seeds [0, 1, 2] "
                            "(one teacher, trained with seed 0, for every seed), 5 held-out init states")
    # 9/10 with its 95% Wilson interval [0.60, 0.98]; the students' mean ± sample std over three seeds.
    assert "| teacher | 90% | 90% [60, 98] (one run, 9/10) | 0.0500 |" in table
    assert "| two_stage | 80%, 80%, 70% | 77% ± 6 | 0.1000 |" in table


def test_learning_curves_average_seeds_and_draw_both_modes(tmp_path):
    series = curve_series(per_seed(), "success")
    assert series["two_stage"] == [pytest.approx((100, 0.2, 0.2, 0.2)), pytest.approx((200, 0.7, 0.6, 0.8))]
    assert series["only_finetune"][1] == pytest.approx((200, 0.1, 0.0, 0.2))
    assert curve_series(per_seed(), "arm_mae")["only_finetune"] == [pytest.approx((100, 0.5, 0.5, 0.5)),
                                                                    pytest.approx((200, 0.4, 0.4, 0.4))]
    path = write_curves(per_seed(), tmp_path / "curves.png")
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (320, 960, 3)
    for half in (img[:, :480], img[:, 480:]):  # both panels draw both modes in their colours
        for color in SERIES_COLORS[:2]:
            assert np.all(half == color, axis=-1).sum() > 20


@pytest.mark.sim
@pytest.mark.slow
def test_evidence_runs_seeds_curves_and_summary_in_libero(tmp_path):
    pytest.importorskip("libero.libero")
    from vitavla.evidence import main as evidence

    out = tmp_path / "ev"
    argv = ["--out", str(out), "--tasks", "0", "--demos", "2", "--teacher-steps", "2", "--align-steps", "2",
            "--finetune-steps", "4", "--curve-points", "2", "--curve-episodes", "1", "--episodes", "1",
            "--max-steps", "3", "--workers", "1", "--render-size", "32", "--batch-size", "4",
            "--seeds", "0", "1", "--modes", "two_stage", "only_finetune"]
    summary = evidence(argv)
    per_seed = json.loads((out / "per_seed.json").read_text())
    assert sorted(per_seed) == ["0", "1"]
    # One teacher, the first seed's, serves both seeds' students: trained and rolled out once.
    assert list(per_seed["0"]) == ["teacher", "two_stage", "only_finetune"]
    assert list(per_seed["1"]) == ["two_stage", "only_finetune"] and not (out / "seed1" / "teacher").exists()
    assert per_seed["0"]["teacher"]["curve"] == []
    for runs in per_seed.values():
        for mode in ("two_stage", "only_finetune"):
            curve = runs[mode]["curve"]
            assert [p["step"] for p in curve] == [2, 4] and all(Path(p["checkpoint"]).is_file() for p in curve)
            assert [p["final"] for p in curve] == [False, True]
            assert all(math.isfinite(p["val"]["val/arm_mae"]) for p in curve)
            assert curve[0]["rollout"]["episodes"] + curve[0]["rollout"]["errors"] == 1
            assert curve[0]["rollout"]["wall_seconds"] != runs[mode]["rollout"]["wall_seconds"]  # its own rollout
            # Curve points record no video (the final evaluation does).
            assert not list(out.glob(f"seed*/curve_{mode}/step2/rollout/videos/*.mp4"))
            assert list(out.glob(f"seed*/eval_{mode}/rollout/videos/*.mp4"))
            # The step-4 checkpoint holds the final weights: the same held-out error as the run's own, and
            # its point is the run's own evaluation rather than a second one.
            assert curve[-1]["val"]["val/arm_mae"] == pytest.approx(runs[mode]["val"]["val/arm_mae"], rel=1e-5)
            assert curve[-1]["rollout"] == runs[mode]["rollout"]
    assert summary["policies"]["two_stage"]["seeds"] == [0, 1] and len(summary["verdict"]) == 2
    assert summary["policies"]["teacher"]["seeds"] == [0]
    table = (out / "summary.md").read_text()
    assert "| two_stage |" in table and "| teacher |" in table and "- two_stage >= only_finetune: " in table
    assert "(one run, " in table.split("| teacher |")[1].split("\n")[0]
    assert Image.open(out / "curves.png").size == (960, 320)
    assert len(list((out / "demos").glob("*_demo.hdf5"))) == 1  # one set of demos serves every seed

    # Resumed with a third seed: seeds 0 and 1 are read back, seed 2 trains against seed 0's teacher.
    before = json.loads((out / "per_seed.json").read_text())
    more = evidence(argv[:-6] + ["--seeds", "0", "1", "2", "--modes", "two_stage", "only_finetune"])
    after = json.loads((out / "per_seed.json").read_text())
    assert sorted(after) == ["0", "1", "2"] and {k: after[k] for k in ("0", "1")} == before
    assert list(after["2"]) == ["two_stage", "only_finetune"] and not (out / "seed2" / "teacher").exists()
    assert more["resumed_seeds"] == [0, 1] and more["policies"]["two_stage"]["seeds"] == [0, 1, 2]
    assert "seeds [0, 1] were finished by an earlier one" in (out / "summary.md").read_text()


def test_resume_reads_finished_seeds_and_refuses_other_settings(tmp_path):
    from vitavla import evidence, quickstart as qs

    def args(*extra):
        return qs.parse(evidence.build_parser(), ["--out", str(tmp_path), *extra])[0]

    assert evidence.resume(args(), tmp_path) == {}  # nothing there yet: the settings are recorded
    assert json.loads((tmp_path / "run_args.json").read_text())["finetune_steps"] == 6000
    (tmp_path / "per_seed.json").write_text(json.dumps({"0": {"two_stage": run(7)}, "5": {"two_stage": run(3)}}))
    # Seeds, workers and verbosity change no result: a run that differs only in them resumes.
    finished = evidence.resume(args("--seeds", "0", "1", "--workers", "1", "--verbose"), tmp_path)
    assert finished == {0: {"two_stage": run(7)}, 5: {"two_stage": run(3)}}
    recorded = (tmp_path / "run_args.json").read_bytes()
    with pytest.raises(SystemExit, match=r"other settings: finetune_steps=6000 \(this run: 100\)"):
        evidence.resume(args("--finetune-steps", "100"), tmp_path)
    assert (tmp_path / "run_args.json").read_bytes() == recorded
    (tmp_path / "run_args.json").write_text("{not json")
    with pytest.raises(SystemExit, match="run_args.json is not valid JSON"):
        evidence.resume(args(), tmp_path)


def test_default_tasks_and_budget(tmp_path):
    """Two tasks by default (0 and 3; the next test checks why those), the teacher's per-task step budget
    for both, three seeds, 15 held-out init states per task, the paper's three modes."""
    from vitavla import evidence, quickstart as qs

    args, _ = qs.parse(evidence.build_parser(), ["--out", str(tmp_path)])
    assert args.tasks == [0, 3] and args.teacher_steps == 2 * qs.TEACHER_STEPS_PER_TASK
    assert args.finetune_steps == 2 * qs.FINETUNE_STEPS_PER_TASK == 6000 and args.jobs == 2
    one, _ = qs.parse(qs.build_parser(), ["--out", str(tmp_path)])  # the quickstart: one task, half of each
    assert one.tasks == [0] and (one.teacher_steps, one.finetune_steps, one.jobs) == (3000, 3000, 2)
    assert args.seeds == [0, 1, 2] and args.episodes == 15 and args.modes == list(qs.PAPER_MODES)


@pytest.mark.sim
def test_default_tasks_pick_objects_in_different_places():
    """Tasks 0 (alphabet soup) and 3 (bbq sauce) of libero_object start their objects over 20 cm apart, so a
    policy has to read the instruction to know where to reach."""
    pytest.importorskip("libero.libero")
    from vitavla import evidence, quickstart as qs
    from vitavla.demos.libero_poses import LiberoPoses
    from vitavla.rollout.libero_env import LiberoEnv

    args, _ = qs.parse(evidence.build_parser(), [])
    env = LiberoEnv(args.suite, protocol="seer", render_size=16, max_steps=1, settle_steps=0, seed=0)
    try:
        spots = []
        for task in args.tasks:
            env.reset(task, 0, seed=0)
            spots.append(LiberoPoses(env._env.env, env.task_name(task)).read().object_grasp[:2])
    finally:
        env.close()
    assert np.linalg.norm(spots[0] - spots[1]) > 0.2


@pytest.mark.parametrize("per_seed_teacher", [False, True])
def test_seeds_run_as_one_job_set_and_each_is_saved_when_it_finishes(monkeypatch, tmp_path, per_seed_teacher):
    # Fake trainings and rollouts (--jobs 1 runs them in this process): which teacher each seed's students get,
    # and what per_seed.json holds when the next seed's first training starts.
    from vitavla import evidence, quickstart as qs

    out, seen = tmp_path / "ev", []

    def fake_fit(configs, run_dir, name, steps, overrides, curve_every=0):
        done = out / "per_seed.json"
        teacher = next((o.split("=", 1)[1] for o in overrides if "teacher.init_args.checkpoint=" in o), None)
        seen.append((run_dir.parent.name, name, teacher, sorted(json.loads(done.read_text())) if done.is_file()
                     else []))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "teacher.safetensors").write_bytes(b"")
        return qs.RunResult(name, f"{run_dir}/last.ckpt", str(run_dir), 1, 0.0, {"val/arm_mae": 0.1})

    def fake_eval(args, out_dir, name, run, configs, model, curve_episodes=0):
        return {"successes": 1 + len(name) % 2, "episodes": 2}, {}

    monkeypatch.setattr(qs, "_fit", fake_fit)
    monkeypatch.setattr(qs, "evaluate_policy", fake_eval)
    monkeypatch.setattr(qs, "record_demos", lambda args, o: qs.Demos(o / "demos", 2, 2, False, 0.0))
    argv = ["--out", str(out), "--seeds", "0", "1", "--modes", "two_stage", "--jobs", "1"]
    summary = evidence.main(argv + (["--teacher-per-seed"] if per_seed_teacher else []))
    teachers = {seed: str(out / seed / "teacher" / "teacher.safetensors") for seed in ("seed0", "seed1")}
    students = [(seed, name, teacher) for seed, name, teacher, _ in seen if name != "teacher"]
    assert students == [("seed0", "align", teachers["seed0"]), ("seed0", "two_stage", teachers["seed0"]),
                        ("seed1", "align", teachers["seed1" if per_seed_teacher else "seed0"]),
                        ("seed1", "two_stage", teachers["seed1" if per_seed_teacher else "seed0"])]
    assert [name for seed, name, _, _ in seen if seed == "seed1"][0] == ("teacher" if per_seed_teacher else "align")
    # Seed 0 was saved before anything of seed 1 ran.
    assert all(done == ["0"] for seed, _, _, done in seen if seed == "seed1")
    assert summary["policies"]["two_stage"]["seeds"] == [0, 1]
    assert summary["policies"]["teacher"]["seeds"] == ([0, 1] if per_seed_teacher else [0])
