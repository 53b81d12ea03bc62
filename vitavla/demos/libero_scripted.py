"""Scripted pick-and-place demonstrations in LIBERO, written in LIBERO's own HDF5 layout.

    vitavla demos libero --suite libero_object --tasks 0 --episodes 20 --out data/demos --image-size 64

For tasks whose BDDL goal is a single ``(In obj target_contain_region)`` or ``(On obj target)`` (all of
``libero_object``, the bowl-on-plate tasks of ``libero_spatial``), :class:`PickPlaceExpert` reads the object
and target poses from the simulator every step and drives LIBERO's OSC delta-pose controller through
above-object, descend, close, lift, above-target, lower, open and retreat. Only episodes the env reports as
successful (LIBERO's BDDL goal check) are kept.

Output: one ``<TASK_NAME>_demo.hdf5`` per task with ``data/demo_<i>/{actions, executed_actions, dones,
rewards, states, robot_states, obs/{agentview_rgb, eye_in_hand_rgb, ee_states, ee_pos, ee_ori, gripper_states,
joint_states}}`` and ``data.attrs["problem_info"]`` holding the task's language instruction, the layout
:class:`datamodules.libero.LiberoReader` reads. Images are stored in the simulator's native (upside-down)
orientation like the original LIBERO release, i.e. what :class:`~vitavla.rollout.libero_env.LiberoEnv`
gives policies with ``flip_images=False``. Episode ``i`` starts from the task's fixed init state
``i % 50`` after ``--settle-steps`` of ``--settle-action`` (default: arm still, gripper open), so rollouts in
a LiberoEnv given the same two values start where the demos did.

Files are written to ``<name>.tmp`` and renamed over the old file only when complete: an interrupted run
never corrupts an existing file, and a rerun tops a file up to ``--episodes`` demos, continuing with the
next init state.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitavla.demos.libero_hdf5 import DemoWriter, demo_path, existing_demos, recorded_recipe
from vitavla.demos.libero_poses import LiberoPoses
from vitavla.demos.pick_place_expert import OPEN, ExpertConfig, Phase, PickPlaceExpert, reach_action


# -- recording ----------------------------------------------------------------------------------------
@dataclass
class GenConfig:
    """One generation run (see :func:`main` for the command line)."""

    suite: str = "libero_object"
    tasks: tuple[int, ...] = (0,)
    episodes: int = 20
    out: str = "data/demos"
    image_size: int = 64
    max_steps: int = 250
    max_attempts: int | None = None
    workers: int = 1
    seed: int = 0
    noise: float = 0.2
    """Std of the noise on the executed position actions (action units)."""
    waypoint_noise: float = 0.01
    clean_labels: bool = True
    """Store the expert's noise-free action as the label while executing the noisy one (DART, Laskey et al.
    2017): the noise spreads the demos' states around the clean path and each label steers back to it, so a
    policy learns to correct its own drift instead of only the path itself."""
    settle_steps: int = 10
    """Steps of ``settle_action`` before the first recorded frame (10: the gripper ends fully open)."""
    settle_action: str = "noop"
    """Command while settling (``LiberoEnv.settle_action``): ``noop`` keeps the gripper open, so every demo
    starts open; ``zeros`` is Seer's protocol (the gripper drifts half shut before the first frame)."""
    start_offset: float = 0.0
    """Half-width (metres) of a uniform random displacement of the gripper from its home pose, reached
    before the first recorded frame. LIBERO starts every episode of a task at nearly the same pose, so without
    it all demos follow one path and a policy never sees how to come back to it from a few centimetres off."""
    start_offset_steps: int = 30
    """Most unrecorded steps spent reaching the displaced start pose."""
    funnel_radius: float = 0.0
    """The expert's funnel approach (:attr:`ExpertConfig.funnel_radius`, metres); 0 = line up, then descend."""
    descend_xy_gain: float = 1.0
    """The expert's horizontal gain factor while descending (:attr:`ExpertConfig.descend_xy_gain`)."""
    xy_tolerance: float = 0.008
    """Horizontal error (metres) below which the expert counts a waypoint reached and may close
    (:attr:`ExpertConfig.xy_tolerance`)."""
    fast_render: bool = True
    mesh_lod: bool = True
    """Render-only meshes with fewer triangles (:mod:`vitavla.rollout.mesh_lod`); rollouts must match it."""
    progress: bool = True

    def recipe(self) -> dict:
        """The settings that shape a demo (stored in every file): a file is only topped up, or reused, by a
        run with the same ones. Suite and task are in the file's name; workers and progress change nothing."""
        skip = {"suite", "tasks", "episodes", "out", "max_attempts", "workers", "progress"}
        return {k: v for k, v in vars(self).items() if k not in skip}


RECIPE_BEFORE_KEY = {"mesh_lod": False}
"""What a setting was before it was recorded in the files' recipe (when its default changed the demos)."""


@dataclass
class Demo:
    """One recorded episode: T steps of observations (before the action) and actions."""

    task: int
    attempt: int
    init_state: int
    success: bool
    steps: int
    seconds: float
    arrays: dict[str, np.ndarray] | None = None


class _Worker:
    """A LiberoEnv and the loop that records one attempt; one per process."""

    def __init__(self, cfg: GenConfig):
        from vitavla.rollout.libero_env import LiberoEnv

        self.cfg = cfg
        self.env = LiberoEnv(cfg.suite, protocol="seer", render_size=cfg.image_size, max_steps=cfg.max_steps,
                             settle_steps=cfg.settle_steps, settle_action=cfg.settle_action,
                             flip_images=False, gripper_state="width",
                             seed=cfg.seed, fast_render=cfg.fast_render, mesh_lod=cfg.mesh_lod)

    def record(self, task: int, attempt: int) -> Demo:
        cfg, env = self.cfg, self.env
        start = time.perf_counter()
        init_state = attempt % env.num_init_states(task)
        obs = env.reset(task, init_state, seed=cfg.seed + attempt)
        sim_env = env._env.env
        # Later resets of this task skip the model rebuild (~3 s of a ~15 s demo): set_init_state overwrites
        # the whole MuJoCo state, so a soft reset starts from the identical state (checked: same images).
        sim_env.hard_reset = False
        poses = LiberoPoses(sim_env, env.task_name(task))
        rng = np.random.default_rng([cfg.seed, task, attempt])
        expert = PickPlaceExpert(ExpertConfig(noise=cfg.noise, waypoint_noise=cfg.waypoint_noise,
                                               funnel_radius=cfg.funnel_radius,
                                               descend_xy_gain=cfg.descend_xy_gain,
                                               xy_tolerance=cfg.xy_tolerance), rng=rng)
        if cfg.start_offset > 0:
            obs = self._displace(poses, rng, obs)
        robot = sim_env.robots[0]
        rec: dict[str, list] = {k: [] for k in ("agentview_rgb", "eye_in_hand_rgb", "ee_states",
                                                "gripper_states", "joint_states", "actions", "states",
                                                "executed_actions")}
        success, done_wait = False, 0
        for _ in range(cfg.max_steps):
            action = expert.act(poses.read())
            label = expert.clean_action if cfg.clean_labels else action
            rec["agentview_rgb"].append(obs.static)
            rec["eye_in_hand_rgb"].append(obs.wrist)
            rec["ee_states"].append(obs.state[:6].astype(np.float64))
            rec["gripper_states"].append(obs.state[6:8].astype(np.float64))
            rec["joint_states"].append(np.array(sim_env.sim.data.qpos[robot._ref_joint_pos_indexes]))
            rec["states"].append(sim_env.sim.get_state().flatten())
            rec["actions"].append(label)
            rec["executed_actions"].append(action)
            obs, _, success, _ = env.step(action)
            if success or expert.failed:
                break
            if expert.phase == Phase.DONE:
                done_wait += 1
                if done_wait > 15:  # released but the goal never held: a miss, stop paying for renders
                    break
        steps = len(rec["actions"])
        arrays = None
        if success:
            arrays = {k: np.stack(v) for k, v in rec.items()}
        return Demo(task, attempt, init_state, success, steps, time.perf_counter() - start, arrays)

    def _displace(self, poses: LiberoPoses, rng: np.random.Generator, obs):
        """Move the gripper (open, orientation held) to home + U(-r, r)^3 without recording; returns the
        observation there. The expert then starts from that pose as from any other."""
        cfg = self.cfg
        home = poses.read()
        goal = home.eef_pos + rng.uniform(-cfg.start_offset, cfg.start_offset, 3)
        for _ in range(cfg.start_offset_steps):
            p = poses.read()
            if np.linalg.norm(goal - p.eef_pos) < 0.005:
                break
            action = np.append(reach_action(p.eef_pos, goal, home.eef_quat, p.eef_quat), OPEN)
            obs, _, _, _ = self.env.step(np.clip(action, -1.0, 1.0))
        return obs

    def close(self) -> None:
        self.env.close()


_WORKER: _Worker | None = None


def _init_worker(cfg: GenConfig) -> None:
    global _WORKER
    from vitavla.console import route_from_env

    route_from_env()  # third-party output into the parent's log file, as in the parent
    _WORKER = _Worker(cfg)


def _run_job(job: tuple[int, int]) -> Demo:
    return _WORKER.record(*job)


@dataclass
class TaskResult:
    """Outcome of one task's generation."""

    task: int
    path: Path
    kept: int
    attempted: int
    steps: list[int]
    seconds: list[float]


def _task_info(cfg: GenConfig, task: int) -> tuple[str, dict, dict, str]:
    from vitavla.console import third_party_stdout
    from vitavla.rollout.libero_env import import_libero

    benchmark, get_path, _ = import_libero()
    with third_party_stdout():  # LIBERO prints its task order
        bench = benchmark.get_benchmark_dict()[cfg.suite]()
    t = bench.get_task(task)
    bddl = os.path.join(get_path("bddl_files"), t.problem_folder, t.bddl_file)
    from libero.libero.envs.bddl_utils import get_problem_info

    problem = get_problem_info(bddl)
    # The benchmark's task language, not the BDDL's (they differ, e.g. "pick" vs "pick up"): it is what
    # LiberoEnv gives policies at rollout, so training and evaluation see the same instruction.
    info = {"problem_name": problem["problem_name"], "domain_name": problem["domain_name"],
            "language_instruction": t.language}
    env_args = {"env_name": t.name, "suite": cfg.suite, "task_index": task, "camera_heights": cfg.image_size,
                "camera_widths": cfg.image_size, "controller": "OSC_POSE", "control_freq": 20,
                "settle_steps": cfg.settle_steps, "settle_action": cfg.settle_action, "fast_render": cfg.fast_render,
                "mesh_lod": cfg.mesh_lod,
                "image_orientation": "native (upside down; LiberoEnv flip_images=False)"}
    return t.name, info, env_args, bddl


def generate(cfg: GenConfig, log: Callable[[str], None] = print) -> list[TaskResult]:
    """Record ``cfg.episodes`` successful demos per task (topping up existing files); returns per-task stats.

    Attempts go to ``cfg.workers`` spawned processes (one LiberoEnv each) in order; the kept demos are the
    first successes in attempt order, so the output does not depend on the number of workers.
    """
    from vitavla.console import third_party_stdout
    from vitavla.rollout.libero_env import import_libero, set_gl_backend

    if cfg.episodes < 1 or cfg.workers < 1 or cfg.image_size < 8 or cfg.max_steps < 1:
        raise ValueError(f"episodes, workers, max_steps must be >= 1 and image_size >= 8, got "
                         f"{cfg.episodes}, {cfg.workers}, {cfg.max_steps}, {cfg.image_size}")
    set_gl_backend("egl")
    benchmark, _, _ = import_libero()
    suites = benchmark.get_benchmark_dict()
    if cfg.suite not in suites:
        raise ValueError(f"unknown LIBERO suite {cfg.suite!r}; available: {sorted(suites)}")
    with third_party_stdout():  # LIBERO prints its task order
        n_tasks = suites[cfg.suite]().n_tasks
    for t in cfg.tasks:
        if not 0 <= t < n_tasks:
            raise ValueError(f"task {t} outside [0, {n_tasks}) of {cfg.suite}")
    max_attempts = cfg.max_attempts or 3 * cfg.episodes
    plan = []
    for t in cfg.tasks:
        name, info, env_args, bddl = _task_info(cfg, t)
        path = demo_path(cfg.out, name)
        kept, next_attempt = existing_demos(path)
        check_recipe(path, cfg)
        plan.append((t, path, info, env_args, bddl, kept, next_attempt))
        if kept >= cfg.episodes:
            log(f"{path}: already has {kept} demos, nothing to do")

    jobs = [(t, a) for t, _, _, _, _, kept, nxt in plan if kept < cfg.episodes
            for a in range(nxt, nxt + max_attempts)]
    if not jobs:
        return [TaskResult(t, p, kept, 0, [], []) for t, p, _, _, _, kept, _ in plan]
    with _demo_stream(cfg, jobs) as stream:
        return _collect(cfg, plan, stream, log)


def check_recipe(path: Path, cfg: GenConfig) -> None:
    """Refuse to top up or reuse a file recorded with other generator settings (settings the file does not
    record are taken at their defaults)."""
    old = recorded_recipe(path)
    if old is None:
        return
    # Files older than a setting were recorded without it: mesh_lod came after demos at full mesh detail.
    defaults = {**GenConfig().recipe(), **RECIPE_BEFORE_KEY}
    new = cfg.recipe()
    diff = [f"{k}={old.get(k, defaults[k])!r} (this run: {v!r})" for k, v in new.items()
            if old.get(k, defaults[k]) != v]
    if diff:
        raise ValueError(f"{path} was recorded with other settings: {', '.join(diff)}; record into another "
                         "--out, or move the file away to record it afresh")


def ordered_results(pool, fn: Callable, jobs: Iterator, window: int) -> Iterator:
    """``fn(job)`` for each of ``jobs`` on ``pool``, yielded in the jobs' order, with at most ``window`` of them
    submitted and not yet yielded. ``jobs`` is read only as results are taken, so a filter in it (a task that
    has its demos) stops that task's attempts after at most ``window`` more. ``Pool.imap`` would read every
    job at once and run them all: about 40 wasted attempts, 2.5 minutes, between the tasks of a two-task run."""
    pending: deque = deque()
    while True:
        while len(pending) < window:
            job = next(jobs, None)
            if job is None:
                break
            pending.append(pool.apply_async(fn, (job,)))
        if not pending:
            return
        yield pending.popleft().get()


class _demo_stream:
    """Context manager yielding Demos for jobs in order: in-process for one worker, else a spawn pool."""

    def __init__(self, cfg: GenConfig, jobs: list[tuple[int, int]]):
        self.cfg, self.jobs, self.pool, self.worker = cfg, jobs, None, None
        self._skip: set[int] = set()

    def __enter__(self) -> "_demo_stream":
        return self

    def skip_task(self, task: int) -> None:
        """Stop starting attempts of a task (it has its demos)."""
        self._skip.add(task)

    def __iter__(self) -> Iterator[Demo]:
        if self.cfg.workers == 1:
            self.worker = _Worker(self.cfg)
            for job in self.jobs:
                if job[0] not in self._skip:
                    yield self.worker.record(*job)
            return
        import multiprocessing as mp

        # spawn: a forked child would inherit the parent's GL/EGL state, which is not fork-safe.
        self.pool = mp.get_context("spawn").Pool(self.cfg.workers, _init_worker, (self.cfg,))
        yield from ordered_results(self.pool, _run_job, ((t, a) for t, a in self.jobs if t not in self._skip),
                                   window=2 * self.cfg.workers)

    def __exit__(self, *exc) -> None:
        if self.worker is not None:
            self.worker.close()
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _collect(cfg: GenConfig, plan, stream: _demo_stream, log) -> list[TaskResult]:
    from tqdm import tqdm

    results = []
    todo = {t: (path, info, env_args, bddl, kept) for t, path, info, env_args, bddl, kept, _ in plan
            if kept < cfg.episodes}
    total = sum(cfg.episodes - v[4] for v in todo.values())
    bar = tqdm(total=total, desc=f"{cfg.suite} demos", unit="demo", disable=not cfg.progress, file=sys.stderr)
    writer, current = None, None
    attempted = kept_new = 0
    stats: dict[int, TaskResult] = {}
    last_attempt: dict[int, int] = {}
    try:
        for demo in stream:
            if demo.task not in todo:
                continue  # a job of a task already complete (pool prefetch)
            if demo.task != current:
                if writer is not None:
                    writer.close(last_attempt[current] + 1)
                path, info, env_args, bddl, _ = todo[demo.task]
                writer, current = DemoWriter(path, info, env_args, bddl, cfg.recipe()), demo.task
                stats[current] = TaskResult(current, path, writer.kept, 0, [], [])
            attempted += 1
            last_attempt[current] = demo.attempt
            res = stats[current]
            res.attempted += 1
            if demo.success:
                writer.add(demo)
                res.kept, kept_new = writer.kept, kept_new + 1
                res.steps.append(demo.steps)
                res.seconds.append(demo.seconds)
                bar.update(1)
            bar.set_postfix(kept=kept_new, attempted=attempted, success=f"{kept_new / attempted:.0%}")
            if writer.kept >= cfg.episodes:
                writer.close(demo.attempt + 1)
                writer = None
                stream.skip_task(current)
                del todo[current]
                current = None
                if not todo:
                    break
        if writer is not None:  # attempts ran out before enough successes
            writer.close(last_attempt[current] + 1)
            writer = None
    except BaseException:
        if writer is not None:
            # Keep what finished: the demos so far are complete and valid, and a rerun tops the file up.
            writer.close(last_attempt.get(current, -1) + 1)
        raise
    finally:
        bar.close()
    for t, path, _, _, _, kept, _ in plan:
        res = stats.get(t, TaskResult(t, path, kept, 0, [], []))
        results.append(res)
        if res.kept < cfg.episodes:
            log(f"warning: task {t}: only {res.kept}/{cfg.episodes} demos after {res.attempted} attempts "
                f"(raise --max-attempts)")
    return results


def main(argv: list[str] | None = None) -> list[TaskResult]:
    ap = argparse.ArgumentParser(prog="vitavla demos", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="source", required=True)
    lib = sub.add_parser("libero", help="scripted pick-and-place demos in LIBERO (needs the sim extra)",
                         description="Record scripted pick-and-place demos of LIBERO tasks into "
                                     "<out>/<TASK_NAME>_demo.hdf5, keeping only successful episodes.")
    lib.add_argument("--suite", default="libero_object", help="LIBERO suite (default: %(default)s)")
    lib.add_argument("--tasks", default="0", help="task indices, comma-separated, e.g. 0,3 (default: 0)")
    lib.add_argument("--episodes", type=int, default=20, help="successful demos per task (default: 20)")
    lib.add_argument("--out", default="data/demos", help="output directory (default: %(default)s)")
    lib.add_argument("--image-size", type=int, default=64, help="camera height = width in px (default: 64)")
    lib.add_argument("--max-steps", type=int, default=250, help="step budget per attempt (default: 250)")
    lib.add_argument("--max-attempts", type=int, default=None,
                     help="attempts per task before giving up (default: 3 x episodes)")
    lib.add_argument("--workers", type=int, default=1, help="parallel simulator processes (default: 1)")
    lib.add_argument("--seed", type=int, default=0,
                     help="seed of the expert's noise and the env (default: 0)")
    lib.add_argument("--noise", type=float, default=0.2,
                     help="std of the noise on executed position actions, in action units (default: 0.2)")
    lib.add_argument("--noisy-labels", action="store_true",
                     help="store the executed (noisy) actions instead of the expert's clean ones")
    lib.add_argument("--waypoint-noise", type=float, default=0.01,
                     help="std in metres of per-episode waypoint offsets (default: 0.01)")
    lib.add_argument("--settle-steps", type=int, default=10,
                     help="settle steps before recording; 10 open-gripper steps leave the fingers fully open, "
                          "as OpenVLA's protocol (default: %(default)s)")
    lib.add_argument("--settle-action", default="noop", choices=("noop", "zeros"),
                     help="command while settling: noop (arm still, gripper open) or zeros (Seer's protocol; "
                          "the gripper starts half shut) (default: %(default)s)")
    lib.add_argument("--start-offset", type=float, default=0.0,
                     help="half-width in metres of a random gripper displacement from home before recording "
                          "(default: %(default)s)")
    lib.add_argument("--funnel-radius", type=float, default=0.0,
                     help="metres; > 0: the gripper descends only as it lines up with the object, a smooth "
                          "approach a policy imitates more easily (default: %(default)s = line up, then descend)")
    lib.add_argument("--descend-xy-gain", type=float, default=1.0,
                     help="factor on the expert's sideways gain while descending onto the object; > 1 gives "
                          "labels that correct a small sideways error decisively (default: %(default)s)")
    lib.add_argument("--xy-tolerance", type=float, default=0.008,
                     help="metres of sideways error within which the expert counts a waypoint reached and "
                          "closes the gripper (default: %(default)s)")
    lib.add_argument("--full-render", action="store_true",
                     help="keep MSAA, shadows, reflections and every mesh triangle (about 8x slower on CPU)")
    lib.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        tasks = tuple(int(t) for t in args.tasks.split(",") if t.strip())
    except ValueError:
        ap.error(f"--tasks: expected comma-separated integers, got {args.tasks!r}")
    cfg = GenConfig(suite=args.suite, tasks=tasks, episodes=args.episodes, out=args.out,
                    image_size=args.image_size, max_steps=args.max_steps, max_attempts=args.max_attempts,
                    workers=args.workers, seed=args.seed, noise=args.noise, clean_labels=not args.noisy_labels,
                    waypoint_noise=args.waypoint_noise,
                    settle_steps=args.settle_steps, settle_action=args.settle_action,
                    start_offset=args.start_offset, funnel_radius=args.funnel_radius,
                    descend_xy_gain=args.descend_xy_gain, xy_tolerance=args.xy_tolerance,
                    fast_render=not args.full_render, mesh_lod=not args.full_render,
                    progress=not args.no_progress)
    try:
        results = generate(cfg)
    except ValueError as e:
        sys.exit(f"vitavla demos: error: {e}")
    for r in results:
        if r.attempted:
            print(f"task {r.task}: {r.path} ({r.kept} demos; this run {len(r.steps)}/{r.attempted} attempts "
                  f"succeeded, {np.mean(r.steps) if r.steps else 0:.0f} steps and "
                  f"{np.mean(r.seconds) if r.seconds else 0:.1f} s per kept demo)")
        else:
            print(f"task {r.task}: {r.path} ({r.kept} demos)")
    return results


if __name__ == "__main__":
    main()
