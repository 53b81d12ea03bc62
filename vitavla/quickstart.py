"""``vitavla quickstart``: the whole VITA-VLA method on a real simulator, on a laptop CPU, in minutes.

1. **Demonstrations**: a scripted expert records successful pick-and-place episodes in LIBERO
   (:mod:`vitavla.demos.libero_scripted`), in LIBERO's own HDF5 layout.
2. **Teacher**: a small Seer trained on them with Seer's objective (``configs/quickstart/teacher.yaml``).
3. **Stage 1**: the tiny VLM student aligned with the frozen teacher (``align.yaml``).
4. **Stage 2**: fine-tuning from the stage-1 checkpoint (the paper's two_stage; ``--modes`` adds its
   ablations only_finetune and freeze_vlm) (``finetune.yaml``).
5. **Rollouts**: ``vitavla test`` of the teacher and each student in the simulator, from init states the
   demonstrations never used (``eval.yaml``, layered over each policy's training config).

It prints one table (held-out action error and rollout success per policy) and writes it to
``<out>/summary.md`` and ``summary.json``; videos land in ``<out>/eval_<policy>/rollout/videos`` and TensorBoard
logs in every run folder (``tensorboard --logdir <out>``), third-party warnings and logs in ``<out>/quickstart.log``
(``--verbose`` shows them on the console). Re-running with the same ``--out`` reuses the
demonstrations already recorded.

The configs are small on purpose; ``docs/quickstart.md`` gives the GPU-sized ones.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import disable_possible_user_warnings

from vitavla import console
from vitavla.jobs import Call, Job, cpu_share, follow_share, run_jobs
from vitavla.lightning_cli import build_cli

PAPER_MODES = ("two_stage", "only_finetune", "freeze_vlm")
"""The paper's stage-2 mode and its two ablations, in the order of its ranking."""
MODES = (*PAPER_MODES, "two_stage_lora")
"""Stage-2 runs: the paper's modes, then two_stage with LoRA adapters on the LLM (``finetune_lora.yaml``)."""
INIT_MODE = {"two_stage": "two_stage", "only_finetune": "only_finetune", "freeze_vlm": "freeze_vlm",
             "two_stage_lora": "two_stage"}
"""The ``PolicyModule.init_mode`` of each quickstart mode."""
INIT_STATES = 50  # fixed init states per LIBERO task
TEACHER_STEPS_PER_TASK = 3000  # batch 64 over 20 demos of one task: about 65 passes
FINETUNE_STEPS_PER_TASK = 3000  # the same passes for stage 2 (docs/quickstart.md: 3000 against 6000 steps)


def _config_dir() -> Path:
    here = Path(__file__).resolve().parents[1] / "configs" / "quickstart"
    return here if here.is_dir() else Path.cwd() / "configs" / "quickstart"


@dataclass
class RunResult:
    """One trained policy: where it is, how long it trained, its held-out metrics and rollout results."""

    name: str
    checkpoint: str
    log_dir: str
    trainable: int
    seconds: float
    val: dict[str, float]
    rollout: dict = field(default_factory=dict)
    curve: list[dict] = field(default_factory=list)
    """Learning curve (``vitavla evidence``): ``{"step", "checkpoint", "val", "rollout", "final"}`` per saved step;
    the final step's ``rollout`` is the run's own (``--episodes`` per task, not ``--curve-episodes``)."""


def _cli(configs: list[Path], overrides: list[str]):
    args = [a for c in configs for a in ("--config", str(c))] + overrides
    return build_cli(args, run=False)


class _FollowShare(Callback):
    """Each training step runs on the threads of the job's current share (:func:`vitavla.jobs.follow_share`):
    a stage-2 run started beside a rollout takes the second core once the rollout ends."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        follow_share()


def _fit(configs: list[Path], run_dir: Path, name: str, steps: int, overrides: list[str],
         curve_every: int = 0) -> RunResult:
    """Train one stage and validate it on the held-out demonstrations. ``curve_every`` > 0 also saves a
    checkpoint every that many steps and validates each one afterwards (``RunResult.curve``)."""
    cli = _cli(configs, [f"--trainer.default_root_dir={run_dir}", f"--trainer.logger.init_args.save_dir={run_dir}",
                         f"--trainer.max_steps={steps}", "--trainer.enable_model_summary=false", *overrides])
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    if cpu_share() is not None:  # a job beside others: its threads follow its share of the cores
        trainer.callbacks.append(_FollowShare())
    curve_dir = Path(trainer.log_dir) / "curve"
    if curve_every > 0:
        from lightning.pytorch.callbacks import ModelCheckpoint

        # Intermediate weights for learning curves; validated after training, since validating inside
        # the training loop would change its batch order and its timing.
        trainer.callbacks.append(ModelCheckpoint(dirpath=curve_dir, filename="{step}", every_n_train_steps=curve_every,
                                                 save_top_k=-1, save_last=False))
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    # Read now: validating from a curve checkpoint restores the callbacks' state saved in it (an empty path).
    last, final_step = trainer.checkpoint_callback.last_model_path, trainer.global_step
    val = trainer.validate(model, datamodule=data, verbose=False)[0]  # the final weights, before any reload
    curve = []
    saved = sorted(curve_dir.glob("step=*.ckpt"), key=lambda p: int(p.stem.split("=")[1])) if curve_every else []
    for ckpt in saved:
        point = trainer.validate(model, datamodule=data, ckpt_path=str(ckpt), verbose=False)[0]
        step = int(ckpt.stem.split("=")[1])
        # The last point holds the final weights, which the run's own evaluation rolls out already.
        curve.append({"step": step, "checkpoint": str(ckpt), "val": {k: float(v) for k, v in point.items()},
                      "final": step == final_step})
    trainable = sum(c["trainable"] for c in model.parameter_counts().values())
    return RunResult(name, last, trainer.log_dir, trainable, seconds, {k: float(v) for k, v in val.items()},
                     curve=curve)


def _rollout(configs: list[Path], ckpt: str, run_dir: Path, overrides: list[str]) -> dict:
    """``vitavla test`` of one checkpoint; returns its results.json (plus the wall time)."""
    out = run_dir / "rollout"
    if out.is_dir():
        # A quickstart run always trains new checkpoints, so an earlier run's episodes there belong to other
        # weights (and ``vitavla test`` rightly refuses to mix them in): start this evaluation afresh.
        shutil.rmtree(out)
    cli = _cli(configs, [f"--trainer.default_root_dir={run_dir}", f"--trainer.logger.init_args.save_dir={run_dir}",
                         "--trainer.enable_model_summary=false", f"--data.init_args.out_dir={out}", *overrides])
    start = time.perf_counter()
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt, verbose=False)
    results = json.loads((out / "results.json").read_text())
    results["wall_seconds"] = time.perf_counter() - start
    return results


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module doc as written, and every option's default in ``--help``."""


def build_parser(prog: str = "vitavla quickstart", description: str | None = __doc__) -> argparse.ArgumentParser:
    """The quickstart's options (``vitavla evidence`` adds its own to them)."""
    ap = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_HelpFormatter)
    ap.add_argument("--out", default="runs/quickstart", help="run directory (demos, checkpoints, logs, videos)")
    ap.add_argument("--suite", default="libero_object", help="LIBERO suite of the task")
    ap.add_argument("--tasks", type=int, nargs="+", default=[0],
                    help="task indices in the suite (pick-and-place tasks); demos and rollouts cover each")
    ap.add_argument("--demos", type=int, default=20, help="successful demonstrations to record per task")
    ap.add_argument("--start-offset", type=float, default=0.04,
                    help="half-width (m) of the random gripper displacement before each demo starts, so demos "
                         "cover states around the one path LIBERO's fixed start pose gives")
    ap.add_argument("--noise", type=float, default=0.3,
                    help="std of the DART noise on the demos' executed actions (labels stay clean)")
    ap.add_argument("--descend-xy-gain", type=float, default=1.0,
                    help="factor on the expert's sideways gain while it descends onto the object (vitavla demos "
                         "libero --descend-xy-gain)")
    ap.add_argument("--xy-tolerance", type=float, default=0.008,
                    help="sideways error (m) within which the expert counts a waypoint reached and closes")
    ap.add_argument("--render-size", type=int, default=56,
                    help="camera size of demos and rollouts (px); the CPU configs' models read 56 px")
    ap.add_argument("--workers", type=int, default=2, help="simulator processes (demos and rollouts)")
    ap.add_argument("--jobs", type=int, default=2,
                    help="trainings and evaluations that run side by side, as their order allows, sharing the "
                         "cores (a policy rolls out while the next one trains; several modes train at once; a job "
                         "left alone takes every core); 1 runs them one after the other in this process. The "
                         "teacher trains alone")
    ap.add_argument("--teacher-steps", type=int, default=None,
                    help=f"teacher training steps; default {TEACHER_STEPS_PER_TASK} per task, so each task gets "
                         "the passes over its demos that the one-task teacher needs (two tasks at 3000 steps "
                         "completed 3 of 15 task-0 episodes, at 6000 11 of 15; docs/quickstart.md)")
    ap.add_argument("--align-steps", type=int, default=800, help="stage-1 steps")
    ap.add_argument("--finetune-steps", type=int, default=None,
                    help=f"stage-2 steps per mode; default {FINETUNE_STEPS_PER_TASK} per task, as for the teacher "
                         "(one task: 12/20 held-out episodes at 3000 steps, 14/20 at 6000; docs/quickstart.md)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=["two_stage"],
                    help="stage-2 modes to train and evaluate; the paper's ablations only_finetune and "
                         "freeze_vlm each add a stage-2 run and its rollouts (about 3 and 1.5 min alone on 2 "
                         "cores); two_stage_lora fine-tunes LoRA "
                         "adapters instead of the LLM's weights (needs peft: pip install -e '.[lora]')")
    ap.add_argument("--episodes", type=int, default=10,
                    help="rollouts per task and policy (held-out init states)")
    ap.add_argument("--max-steps", type=int, default=140, help="policy steps per rollout")
    ap.add_argument("--batch-size", type=int, default=64, help="training batch size")
    ap.add_argument("--seed", type=int, default=0,
                    help="training seed of every stage (initialisation, batch order, augmentation); the demos "
                         "and the rollouts' init states stay the same, so seeds compare training alone")
    ap.add_argument("--configs", default=None, help="folder holding the quickstart configs")
    ap.add_argument("--scale", default=None,
                    help="a folder of override configs layered over each step's config, e.g. "
                         "configs/quickstart/gpu (bigger teacher and student, bf16 on one GPU)")
    ap.add_argument("--verbose", action="store_true",
                    help="show third-party warnings and logs on the console rather than in <out>/quickstart.log")
    return ap


def parse(ap: argparse.ArgumentParser, argv: list[str] | None):
    """``(args, layered)``: the checked options and ``layered(name)``, a step's config followed by the
    same-named override from ``--scale`` when there is one."""
    args = ap.parse_args(argv)
    if args.teacher_steps is None:
        args.teacher_steps = TEACHER_STEPS_PER_TASK * len(args.tasks)
    if args.finetune_steps is None:
        args.finetune_steps = FINETUNE_STEPS_PER_TASK * len(args.tasks)
    if args.jobs < 1 or args.workers < 1:
        ap.error(f"--jobs and --workers must be >= 1, got {args.jobs} and {args.workers}")
    if args.demos < 2 or not 1 <= args.episodes <= INIT_STATES:
        # The held-out action error needs at least one demonstration kept out of training.
        ap.error(f"--demos must be >= 2 and --episodes in [1, {INIT_STATES}]")
    cfg = Path(args.configs) if args.configs else _config_dir()
    scale = Path(args.scale) if args.scale else None
    if scale is not None and not scale.is_dir():
        ap.error(f"--scale {scale}: not a folder of override configs")

    def layered(name: str) -> list[Path]:
        extra = scale / name if scale is not None else None
        return [cfg / name] + ([extra] if extra is not None and extra.is_file() else [])
    return args, layered


def main(argv: list[str] | None = None) -> dict[str, RunResult]:
    args, layered = parse(build_parser(), argv)
    return run_routed(args, "quickstart.log", _run, layered)


def run_routed(args: argparse.Namespace, log_name: str, run, layered):
    """``run(args, out, layered)`` with third-party output routed to ``<out>/<log_name>`` (``--verbose``: left
    on the console), naming the log file at the end."""
    disable_possible_user_warnings()
    out = Path(args.out)
    with console.routed(out / log_name, verbose=args.verbose) as router:
        result = run(args, out, layered)
        if router is not None:
            print(f"third-party warnings and logs: {router.path} (--verbose shows them here)")
    return result


@dataclass
class Demos:
    """The recorded demonstrations: their folder, how many attempts they used (attempt k starts from init
    state k, so rollouts start after those), whether this run generated them, and how long that took."""

    path: Path
    kept: int
    attempts_used: int
    generated: bool
    seconds: float


def record_demos(args: argparse.Namespace, out: Path) -> Demos:
    """Step 1: the scripted expert's demonstrations under ``out/demos`` (reused when already there)."""
    from vitavla.demos.libero_hdf5 import existing_demos
    from vitavla.demos.libero_scripted import GenConfig, generate

    demos = out / "demos"
    start = time.perf_counter()
    try:
        gen = generate(GenConfig(suite=args.suite, tasks=tuple(args.tasks), episodes=args.demos, out=str(demos),
                                 image_size=args.render_size, workers=args.workers, start_offset=args.start_offset,
                                 noise=args.noise, descend_xy_gain=args.descend_xy_gain,
                                 xy_tolerance=args.xy_tolerance))
    except ValueError as e:  # e.g. demos in --out recorded with other settings: say so, no traceback
        raise SystemExit(f"vitavla quickstart: error: {e}") from None
    seconds = time.perf_counter() - start
    if any(r.kept < args.demos for r in gen):
        raise SystemExit(f"the scripted expert kept {[r.kept for r in gen]} demos of {args.demos}; "
                         "choose other --tasks (single pick-and-place goals)")
    # Demos reused from an earlier run count too, so the file's own record of its attempts is read.
    attempts = max(existing_demos(Path(r.path))[1] for r in gen)
    return Demos(demos, args.demos, attempts, any(r.attempted for r in gen), seconds)


@dataclass
class Plan:
    """One seed's pipeline as jobs, and how to read its policies back once they have run (:func:`plan`)."""

    jobs: list[Job]
    collect: Callable[[dict], tuple[dict[str, RunResult], RunResult | None, list[str]]]
    """``done`` (every job's result by name) -> the policies (teacher first), the stage-1 run, and the overrides
    that point a student's config at the teacher."""


def plan(args: argparse.Namespace, out: Path, layered, demos: Demos, seed: int, curve_every: int = 0,
         curve_modes: tuple[str, ...] = (), teacher_run: RunResult | str | None = None, curve_episodes: int = 0,
         rollouts: bool = True, tag: str = "", ns: str = "") -> Plan:
    """Steps 2-5 under ``out`` as jobs (:mod:`vitavla.jobs`): the teacher, stage 1, stage 2 in ``args.modes``
    (the paper's order), all with training seed ``seed``, and (``rollouts``) each policy's evaluation, which
    starts as soon as that policy is trained, so one policy rolls out while the next one trains.

    ``teacher_run``: a teacher trained earlier (a :class:`RunResult`), or the name of the job that trains it
    among the jobs run together with these (another seed's), which the students distil from instead of
    training one; it is then not among the collected policies. ``curve_every`` > 0 saves checkpoints of
    ``curve_modes`` every that many steps; with ``curve_episodes`` each is rolled out too
    (:func:`evaluate_policy`). ``ns`` prefixes every job name, so the plans of several seeds run as one set."""
    data = [f"--data.init_args.root={demos.path}", f"--data.init_args.batch_size={args.batch_size}",
            f"--data.init_args.stats_cache_dir={out / 'stats'}", f"--seed_everything={seed}"]
    modes = [m for m in MODES if m in args.modes]
    shared = data if training_bars(args.jobs, modes) else [*data, "--trainer.enable_progress_bar=false"]
    jobs: list[Job] = []
    prefix = f"{tag} " if tag else ""
    own_teacher = teacher_run is None
    teacher_job = ns + "teacher" if own_teacher else teacher_run if isinstance(teacher_run, str) else None

    def teacher_result(done: dict) -> RunResult:
        return done[teacher_job] if teacher_job is not None else teacher_run

    def teacher_overrides(done: dict) -> list[str]:
        return [f"--model.init_args.teacher.init_args.checkpoint={_teacher_file(teacher_result(done))}"]

    teacher_dep: tuple[str, ...] = (teacher_job,) if teacher_job is not None else ()
    if own_teacher:
        jobs.append(Job(teacher_job, lambda done: (_fit, (layered("teacher.yaml"), out / "teacher", "teacher",
                                                          args.teacher_steps, data)),
                        exclusive=True, label=f"{prefix}teacher training ({args.teacher_steps} steps)"))
    # Stage 1 only when a mode starts from it: only_finetune alone skips its minute.
    stage1 = any(INIT_MODE[m] != "only_finetune" for m in modes)
    if stage1:
        jobs.append(Job(ns + "align", lambda done: (_fit, (layered("align.yaml"), out / "align", "align",
                                                             args.align_steps, shared + teacher_overrides(done))),
                        teacher_dep, label=f"{prefix}stage 1 ({args.align_steps} steps)"))
    for mode in modes:
        from_align = INIT_MODE[mode] != "only_finetune"

        def make(done: dict, mode: str = mode, from_align: bool = from_align) -> Call:
            init = done[ns + "align"].checkpoint if from_align else "null"
            overrides = shared + teacher_overrides(done) + [f"--model.init_args.init_mode={INIT_MODE[mode]}",
                                                          f"--model.init_args.init_from={init}"]
            return _fit, (stage2_configs(layered, mode), out / f"finetune_{mode}", mode, args.finetune_steps,
                          overrides, curve_every if mode in curve_modes else 0)
        jobs.append(Job(ns + mode, make, teacher_dep + ((ns + "align",) if from_align else ()),
                        label=f"{prefix}stage 2 {mode} ({args.finetune_steps} steps)"))
    policies = (["teacher"] if own_teacher else []) + modes
    if rollouts:
        for name in policies:
            def make_eval(done: dict, name: str = name) -> Call:
                configs = layered("teacher.yaml") if name == "teacher" else stage2_configs(layered, name)
                model = [] if name == "teacher" else teacher_overrides(done) + [
                    "--model.init_args.init_mode=only_finetune", "--model.init_args.init_from=null"]
                return evaluate_policy, (args, out, name, done[ns + name], configs + layered("eval.yaml"), model,
                                         curve_episodes)
            jobs.append(Job(f"{ns}eval_{name}", make_eval, tuple(dict.fromkeys((ns + name, *teacher_dep))),
                            label=f"{prefix}rollouts of {name} ({args.episodes} per task)"))

    def collect(done: dict) -> tuple[dict[str, RunResult], RunResult | None, list[str]]:
        results = {name: done[ns + name] for name in policies}
        for name in policies if rollouts else []:
            results[name].rollout, curve_rollouts = done[f"{ns}eval_{name}"]
            for point in results[name].curve:
                if point.get("final"):  # the final weights' point is the policy's own evaluation
                    point["rollout"] = results[name].rollout
                elif point["step"] in curve_rollouts:
                    point["rollout"] = curve_rollouts[point["step"]]
        return results, done.get(ns + "align"), teacher_overrides(done)

    return Plan(jobs, collect)


def run_plans(plans: list[Plan], jobs: int, on_done: Callable[[str, dict], None] | None = None) -> dict:
    """Run the jobs of ``plans`` as one set on ``jobs`` slots (earlier plans first when several jobs are
    ready); returns every job's result by name. With one slot, one set of simulator processes serves every
    evaluation."""
    every = [job for p in plans for job in p.jobs]
    if jobs == 1:
        from vitavla.rollout.parallel import shared_pools

        with shared_pools():
            return run_jobs(every, 1, on_done=on_done)
    return run_jobs(every, jobs, on_done=on_done)


def pipeline(args: argparse.Namespace, out: Path, layered, demos: Demos, seed: int, curve_every: int = 0,
             curve_modes: tuple[str, ...] = (), teacher_run: RunResult | None = None, curve_episodes: int = 0,
             rollouts: bool = True, tag: str = "") -> tuple[dict[str, RunResult], RunResult | None, list[str]]:
    """:func:`plan` one seed's pipeline and run it (``--jobs`` at a time); returns what its ``collect`` does."""
    p = plan(args, out, layered, demos, seed, curve_every, curve_modes, teacher_run, curve_episodes, rollouts, tag)
    note_reused_init_states(args, demos)
    return p.collect(run_plans([p], args.jobs))


def training_bars(jobs: int, modes: list[str]) -> bool:
    """Whether stage 1 and stage 2 draw progress bars. Two bars on one console would overwrite each other, so
    when trainings can run side by side (several modes and ``jobs`` > 1) each job logs a line instead. One
    mode's trainings follow each other, and only rollouts, which then draw no bar, run beside them. The
    teacher always trains alone and always keeps its bar."""
    return jobs == 1 or len(modes) == 1


def _teacher_file(teacher_run: RunResult) -> Path:
    path = Path(teacher_run.log_dir) / "teacher.safetensors"
    if not path.is_file():
        raise SystemExit(f"teacher training finished without writing {path}")
    return path


def stage2_configs(layered, mode: str) -> list[Path]:
    """The configs a stage-2 mode trains (and is evaluated) with: ``finetune.yaml``, plus
    ``finetune_lora.yaml`` for LoRA modes, so the evaluated model carries the same adapters."""
    configs = layered("finetune.yaml")
    if mode.endswith("_lora"):
        _require_peft(mode)
        configs += layered("finetune_lora.yaml")
    return configs


def _require_peft(mode: str) -> None:
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise SystemExit(f"--modes {mode} needs peft, which this install lacks: pip install -c constraints.txt "
                         "-e '.[lora]'")


def note_reused_init_states(args: argparse.Namespace, demos: Demos) -> None:
    first = INIT_STATES - args.episodes
    if first < demos.attempts_used:
        print(f"note: rollouts reuse init states {first}..{INIT_STATES - 1}, some of which demos started from")


def evaluate_policy(args: argparse.Namespace, out: Path, name: str, run: RunResult, configs: list[Path],
                    model: list[str], curve_episodes: int = 0) -> tuple[dict, dict[int, dict]]:
    """Step 5 for one policy: ``vitavla test`` of its checkpoint from init states the demos never started from,
    and (``curve_episodes`` > 0) of each of its learning-curve checkpoints but the last, which holds the final
    weights. ``configs``: its training configs, then the evaluation's; ``model``: overrides of its model
    section. Returns its results.json and ``{curve step: results.json}``."""
    from vitavla.rollout.parallel import shared_pools

    # Each job's simulators: its share of --workers, set when it starts (all of them when it runs alone).
    share = cpu_share()
    sims = max(1, args.workers * (share or 1) // args.jobs)
    env = [f"--data.init_args.env.init_args.suite={args.suite}",
           f"--data.init_args.tasks=[{','.join(map(str, args.tasks))}]",
           f"--data.init_args.env.init_args.render_size={args.render_size}",
           f"--data.init_args.env.init_args.max_steps={args.max_steps}",
           f"--data.init_args.num_envs={sims}"]
    if args.jobs > 1:
        env.append("--trainer.enable_progress_bar=false")
    held_out = [f"--data.init_args.episodes_per_task={args.episodes}",
                f"--data.init_args.first_episode={INIT_STATES - args.episodes}"]
    # Curve points use the last `curve_episodes` of the same held-out init states, without videos: a recorded
    # episode renders a 256 px camera as well, which nearly doubles its simulator time.
    curve_held_out = [f"--data.init_args.episodes_per_task={curve_episodes}",
                      f"--data.init_args.first_episode={INIT_STATES - curve_episodes}",
                      "--data.init_args.record_videos_per_task=0"]
    with shared_pools():  # the final and the curve evaluations share one set of simulator processes
        rollout = _rollout(configs, run.checkpoint, out / f"eval_{name}",
                           env + held_out + model)
        curve = {}
        for point in run.curve if curve_episodes else []:
            if not point.get("final"):  # the final weights: their full evaluation, not a smaller one again
                curve[point["step"]] = _rollout(configs, point["checkpoint"],
                                                out / f"curve_{name}" / f"step{point['step']}",
                                                env + curve_held_out + model)
    return rollout, curve


def _run(args: argparse.Namespace, out: Path, layered) -> dict[str, RunResult]:
    wall = time.perf_counter()
    demos = record_demos(args, out)
    results, align, _ = pipeline(args, out, layered, demos, args.seed)
    summary = {"demos": {"kept": demos.kept, "attempted": demos.attempts_used, "seconds": demos.seconds,
                         "generated": demos.generated, "path": str(demos.path)},
               "align": asdict(align) if align is not None else None, "runs": {k: asdict(v) for k, v in results.items()},
               "wall_seconds": time.perf_counter() - wall}
    table = format_table(results, align, summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(table + "\n")
    print(table)
    print(f"\nruns, checkpoints, rollout videos and TensorBoard logs: {out}/ (tensorboard --logdir {out})")
    return results


def format_success(rollout: dict) -> str:
    """``0.40 [0.17, 0.69] (4/10)``: the rate, its 95% Wilson interval and the counts (errors apart)."""
    from vitavla.rollout.stats import wilson_interval

    wins, n = int(rollout.get("successes", 0)), int(rollout.get("episodes", 0))
    errors = f", {rollout['errors']} errors" if rollout.get("errors") else ""
    ci = wilson_interval(wins, n)
    if ci is None:
        return f"n/a ({wins}/{n}{errors})"
    return f"{wins / n:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] ({wins}/{n}{errors})"


def format_table(results: dict[str, RunResult], align: RunResult | None, summary: dict) -> str:
    """One markdown table: held-out action error (val split of the demos) and rollout success."""
    d = summary["demos"]
    made = (f"{d['kept']} from {d['attempted']} scripted attempts ({d['seconds']:.0f} s)" if d["generated"]
            else f"{d['kept']} reused from {d['path']}")
    stage1 = ("Stage 1: not run (no mode starts from it)." if align is None else
              f"Stage 1: val/align_mse {align.val.get('val/align_mse', float('nan')):.4f}, "
              f"{align.trainable:,} trainable, {align.seconds:.0f} s.")
    head = f"Demonstrations: {made}. {stage1}"
    rows = ["| policy | trainable params | train s | held-out arm MAE | held-out gripper acc "
            "| rollout success [95% Wilson] (successes/episodes) |",
            "|---|---|---|---|---|---|"]
    for name, r in results.items():
        label = "teacher (Seer, trained here)" if name == "teacher" else f"student {name}"
        rows.append(f"| {label} | {r.trainable:,} | {r.seconds:.0f} | {r.val.get('val/arm_mae', float('nan')):.4f} "
                    f"| {r.val.get('val/gripper_acc', float('nan')):.3f} | {format_success(r.rollout)} |")
    return "\n".join([head, "", *rows, "", f"Total wall time: {summary['wall_seconds'] / 60:.1f} min"])
