"""``vitavla evidence``: the quickstart's pipeline over several training seeds and tasks, with learning curves,
to see whether the paper's claims hold at small scale beyond seed noise.

One set of scripted demonstrations (``--tasks``, default two libero_object tasks trained together, so the
instruction matters) and one teacher trained on them (the first seed's; ``--teacher-per-seed`` trains one per
seed), then for every ``--seeds`` value: stage 1 and the stage-2 ``--modes`` (default all three), each rolled
out on ``--episodes`` held-out init states per task. two_stage and only_finetune also save ``--curve-points``
checkpoints; each is validated (held-out action error) and rolled out on ``--curve-episodes`` init states per
task, except the last, the final weights, whose point is the run's own evaluation.

Writes ``<out>/summary.md`` (success per policy and seed, mean ± std over seeds, the teacher gap, and whether
two_stage >= only_finetune > freeze_vlm holds beyond seed noise), ``summary.json`` and ``curves.png``
(held-out arm MAE and rollout success against training steps, two_stage vs only_finetune: the paper's claim
is that alignment makes fine-tuning efficient). docs/quickstart.md gives the measured numbers and the cost.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

from vitavla import quickstart as qs
from vitavla.rollout.stats import wilson_interval

CURVE_MODES = ("two_stage", "only_finetune")
NOISE_SE = 2.0  # a difference counts as beyond seed noise when it exceeds this many standard errors


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std needs at least one value")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def success_rate(rollout: dict) -> float:
    n = int(rollout.get("episodes", 0))
    return int(rollout.get("successes", 0)) / n if n else float("nan")


def aggregate(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """``{policy: {"seeds", "success" (per seed), "mean", "std", "episodes", "successes", "arm_mae",
    "arm_mae_mean"}}`` from ``{seed: {policy: asdict(RunResult)}}``; policies in the order they first appear.
    A shared teacher lives in one seed only, and not always the lowest (``--seeds 1``, then ``--seeds 0 1``)."""
    seeds = sorted(per_seed)
    out: dict[str, dict] = {}
    for policy in dict.fromkeys(p for s in seeds for p in per_seed[s]):
        ran = [s for s in seeds if policy in per_seed[s]]
        runs = [per_seed[s][policy] for s in ran]
        success = [success_rate(r["rollout"]) for r in runs]
        mae = [float(r["val"].get("val/arm_mae", float("nan"))) for r in runs]
        mean, std = mean_std(success)
        out[policy] = {"seeds": ran, "success": success, "mean": mean, "std": std,
                       "episodes": [int(r["rollout"].get("episodes", 0)) for r in runs],
                       "successes": [int(r["rollout"].get("successes", 0)) for r in runs],
                       "arm_mae": mae, "arm_mae_mean": mean_std(mae)[0]}
    return out


def compare(a: dict, b: dict) -> tuple[float, float | None]:
    """Difference of mean success (a - b) and its standard error over seeds (None with one seed each)."""
    if len(a["success"]) < 2 or len(b["success"]) < 2:
        return a["mean"] - b["mean"], None
    se = math.sqrt(a["std"] ** 2 / len(a["success"]) + b["std"] ** 2 / len(b["success"]))
    return a["mean"] - b["mean"], se


def verdict(agg: dict[str, dict]) -> list[str]:
    """Plain sentences: the teacher gap, and each step of the paper's ordering two_stage >= only_finetune >
    freeze_vlm with its difference, standard error and whether it is beyond seed noise (> 2 SE)."""
    lines = []
    if "teacher" in agg and "two_stage" in agg:
        gap = agg["teacher"]["mean"] - agg["two_stage"]["mean"]
        side = "below" if gap >= 0 else "above"
        lines.append(f"two_stage is {abs(round(gap * 100))} points {side} the teacher "
                     f"({'within' if gap <= 0.10 + 1e-9 else 'outside'} the 10-point target).")
    for hi, lo, strict in (("two_stage", "only_finetune", False), ("only_finetune", "freeze_vlm", True)):
        if hi not in agg or lo not in agg:
            continue
        diff, se = compare(agg[hi], agg[lo])
        sign = ">" if strict else ">="
        holds = diff > 0 if strict else diff >= 0
        if se is None:
            noise = "one seed, so no estimate of seed noise"
        elif se == 0:
            noise = "no spread across seeds"
        else:
            noise = (f"{abs(diff) / se:.1f} standard errors, "
                     f"{'beyond' if abs(diff) > NOISE_SE * se else 'within'} seed noise")
        lines.append(f"{hi} {sign} {lo}: {'holds' if holds else 'does not hold'} "
                     f"(difference {round(diff * 100):+d} points; {noise}).")
    return lines


def curve_series(per_seed: dict[int, dict[str, dict]], key: str) -> dict[str, list[tuple]]:
    """``{mode: [(step, mean, min, max), ...]}`` over seeds for ``key``: ``"arm_mae"`` (held-out) or
    ``"success"`` (rollouts of the curve checkpoints)."""
    series: dict[str, list[tuple]] = {}
    for mode in CURVE_MODES:
        by_step: dict[int, list[float]] = {}
        for runs in per_seed.values():
            for point in runs.get(mode, {}).get("curve", []):
                value = (point["val"].get("val/arm_mae", float("nan")) if key == "arm_mae"
                         else success_rate(point.get("rollout", {})))
                if math.isfinite(value):
                    by_step.setdefault(int(point["step"]), []).append(float(value))
        if by_step:
            series[mode] = [(s, sum(v) / len(v), min(v), max(v)) for s, v in sorted(by_step.items())]
    return series


def write_curves(per_seed: dict[int, dict[str, dict]], path: Path) -> Path:
    """``curves.png``: held-out arm MAE and rollout success against training steps, mean over seeds with the
    min-max range, two_stage vs only_finetune."""
    from vitavla.plots import line_panel, side_by_side

    seeds = f"{len(per_seed)} seeds: mean, min-max" if len(per_seed) > 1 else "1 seed"
    img = side_by_side([
        line_panel(curve_series(per_seed, "arm_mae"), f"held-out arm MAE ({seeds})",
                   "arm MAE"),
        line_panel(curve_series(per_seed, "success"), f"rollout success ({seeds})",
                   "success", y_range=(0.0, 1.0))])
    img.save(path)
    return path


def format_summary(agg: dict[str, dict], lines: list[str], args: argparse.Namespace, minutes: float) -> str:
    # Every seed any policy ran: a shared teacher has only the first, so no single policy's list will do.
    seeds = sorted({s for a in agg.values() for s in a["seeds"]})
    teacher = agg.get("teacher", {}).get("seeds", [])
    shared = (f" (one teacher, trained with seed {teacher[0]}, for every seed)"
              if len(teacher) == 1 and len(seeds) > 1 else "")
    head = (f"Evidence run: suite {args.suite}, tasks {args.tasks}, {args.demos} demos per task, seeds {seeds}"
            f"{shared}, {args.episodes} held-out init states per task and policy.")
    rows = ["| policy | success per seed | mean ± std over seeds | held-out arm MAE (mean) |", "|---|---|---|---|"]
    for policy, a in agg.items():
        per = ", ".join(f"{s * 100:.0f}%" for s in a["success"])
        if len(a["success"]) == 1:  # one run (the shared teacher): its 95% Wilson interval, not a spread
            wins, n = a["successes"][0], a["episodes"][0]
            lo, hi = wilson_interval(wins, n) or (float("nan"), float("nan"))
            spread = f"{a['mean'] * 100:.0f}% [{lo * 100:.0f}, {hi * 100:.0f}] (one run, {wins}/{n})"
        else:
            spread = f"{a['mean'] * 100:.0f}% ± {a['std'] * 100:.0f}"
        rows.append(f"| {policy} | {per} | {spread} | {a['arm_mae_mean']:.4f} |")
    return "\n".join([head, "", *rows, "", *[f"- {line}" for line in lines], "",
                      f"Learning curves: curves.png. Total wall time: {minutes:.1f} min"])


def build_parser() -> argparse.ArgumentParser:
    ap = qs.build_parser("vitavla evidence", __doc__)
    # Tasks 0 (alphabet soup) and 3 (bbq sauce): two objects at different places, so the instruction decides
    # where to go. Task 1 (cream cheese, a flat box with under 2 cm to spare in the gripper) stays at 0-1 of 15
    # for a state-only teacher; docs/quickstart.md has the measurements.
    # jobs 2: its three modes per seed train side by side, one core each, and roll out while the next trains
    ap.set_defaults(out="runs/evidence", tasks=[0, 3], modes=list(qs.PAPER_MODES), episodes=15, jobs=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (all stages)")
    ap.add_argument("--curve-points", type=int, default=3,
                    help="intermediate checkpoints per two_stage / only_finetune run (learning curves)")
    ap.add_argument("--teacher-per-seed", action="store_true",
                    help="train and evaluate a teacher for every seed; by default one teacher (the first seed's) "
                         "serves every seed's students, so seeds compare the students' training alone and the "
                         "run saves a teacher's training and rollouts per extra seed")
    ap.add_argument("--curve-episodes", type=int, default=5,
                    help="rollouts per task of every learning-curve checkpoint")
    return ap


def main(argv: list[str] | None = None) -> dict:
    ap = build_parser()
    args, layered = qs.parse(ap, argv)
    if args.curve_points < 1 or not 0 <= args.curve_episodes <= qs.INIT_STATES:
        ap.error(f"--curve-points must be >= 1 and --curve-episodes in [0, {qs.INIT_STATES}]")
    if len(set(args.seeds)) != len(args.seeds):
        ap.error(f"--seeds {args.seeds}: repeated seeds")
    return qs.run_routed(args, "evidence.log", _run, layered)


RESUME_IGNORED = ("out", "seeds", "verbose", "workers", "jobs")
"""Options that may differ between a run and the one it resumes: they change no trained policy or result."""


def resume(args: argparse.Namespace, out: Path) -> dict[int, dict[str, dict]]:
    """Every seed an earlier run into ``out`` finished (``per_seed.json``), when it used the same settings.

    A seed is written only once its policies are trained and rolled out, so a stopped run resumes at the
    first seed it had not finished. Settings that shape the results must match the earlier run's
    (``run_args.json``); a difference is an error naming each one, and nothing in ``out`` is changed."""
    recorded, done = out / "run_args.json", out / "per_seed.json"
    now = {k: v for k, v in vars(args).items() if k not in RESUME_IGNORED}
    if recorded.is_file():
        try:
            before = json.loads(recorded.read_text())
        except json.JSONDecodeError as e:
            raise SystemExit(f"vitavla evidence: error: {recorded} is not valid JSON ({e}); move it away to start "
                             "afresh") from None
        diff = [f"{k}={before.get(k)!r} (this run: {now.get(k)!r})" for k in sorted(set(before) | set(now))
                if k not in RESUME_IGNORED and before.get(k) != now.get(k)]
        if diff:
            raise SystemExit(f"vitavla evidence: error: {out} holds a run with other settings: {', '.join(diff)}; "
                             "use another --out, or the same settings to resume it")
    out.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(now, indent=2, default=str) + "\n")
    if not done.is_file():
        return {}
    return {int(seed): runs for seed, runs in json.loads(done.read_text()).items()}


def _run(args: argparse.Namespace, out: Path, layered) -> dict:
    wall = time.perf_counter()
    finished = resume(args, out)
    demos = qs.record_demos(args, out)
    every = max(1, args.finetune_steps // args.curve_points)
    stored: dict[int, dict[str, dict]] = dict(finished)  # every finished seed, asked for now or not
    # The teacher every seed's students distil from (unless per seed): a finished seed's, else the first's.
    shared = None
    owner = next((s for s in args.seeds if "teacher" in finished.get(s, {})), None)
    if owner is not None and not args.teacher_per_seed:
        shared = qs.RunResult(**finished[owner]["teacher"])
        teacher_file = Path(shared.log_dir) / "teacher.safetensors"
        if any(s not in finished for s in args.seeds) and not teacher_file.is_file():
            raise SystemExit(f"vitavla evidence: error: seed {owner}'s teacher {teacher_file} is gone; the remaining "
                             "seeds need it (or start afresh in another --out)")
    # Every seed's jobs run as one set: a seed's last rollouts share the cores with the next seed's trainings
    # instead of leaving one idle, and the earlier seed's jobs go first whenever several are ready.
    plans: list[tuple[int, qs.Plan]] = []
    teacher = None if args.teacher_per_seed else shared
    for seed in args.seeds:
        if seed in finished:
            print(f"seed {seed}: finished by an earlier run into {out} (per_seed.json), reused")
            continue
        ns = f"seed{seed}/"
        plans.append((seed, qs.plan(args, out / f"seed{seed}", layered, demos, seed, every, CURVE_MODES,
                                    teacher_run=teacher, curve_episodes=args.curve_episodes,
                                    tag=f"seed {seed}:", ns=ns)))
        if teacher is None and not args.teacher_per_seed:
            teacher = ns + "teacher"  # the later seeds distil from this seed's teacher, trained in this run
    names = {seed: {job.name for job in p.jobs} for seed, p in plans}

    def save_finished(_: str, done: dict) -> None:
        for seed, p in plans:
            if seed not in stored and names[seed] <= done.keys():
                results, _, _ = p.collect(done)
                stored[seed] = {name: asdict(r) for name, r in results.items()}
                # Written as each seed finishes, so a stopped run keeps what finished (and resumes after it).
                ordered = {s: stored[s] for s in sorted(stored)}
                (out / "per_seed.json").write_text(json.dumps(ordered, indent=2) + "\n")

    if plans:
        qs.note_reused_init_states(args, demos)
        qs.run_plans([p for _, p in plans], args.jobs, save_finished)
    per_seed = {seed: stored[seed] for seed in args.seeds}
    reused = sorted(seed for seed in args.seeds if seed in finished)
    agg = aggregate(per_seed)
    lines = verdict(agg)
    write_curves(per_seed, out / "curves.png")
    minutes = (time.perf_counter() - wall) / 60
    table = format_summary(agg, lines, args, minutes)
    if reused:
        table += f" (this invocation; seeds {reused} were finished by an earlier one)"
    summary = {"policies": agg, "verdict": lines, "wall_minutes": minutes, "args": vars(args),
               "resumed_seeds": reused}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "summary.md").write_text(table + "\n")
    print(table)
    return summary
