"""Episodes per hour of closed-loop evaluation: 1 simulator vs N parallel simulators, in one run.

    python benchmarks/rollout_parallel.py --env standin --sim-cost-ms 20 --episodes 16
    python benchmarks/rollout_parallel.py --env libero --max-steps 20 --episodes 8

Rows: ``sequential`` (run_episode in this process, today's N = 1 path) and ``pool N`` for N = 1, 2, ...
(EnvPool workers, batched policy calls). Pool start (spawning workers: imports) and, for LIBERO, simulator
creation (first reset of a task in each worker) happen in an untimed warm-up wave and are reported apart.
The goal of issue #4 is a speed-up >= 0.8 N over one simulator for N up to the cores.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import numpy as np
import torch

from vitavla.rollout.env import ScriptedStandInEnv
from vitavla.rollout.executors import FirstActionExecutor
from vitavla.rollout.parallel import EnvPool, default_workers, run_wave
from vitavla.rollout.runner import EpisodeSpec, run_episode
from vitavla.streaming import StreamingPolicy


def tiny_random_policy() -> StreamingPolicy:
    """A randomly initialised tiny InternVL student + Seer head (as tests/conftest.py builds it)."""
    from teachers.base import ActionHead
    from vitavla.backbones.internvl import InternVLBackbone
    from vitavla.policy import VLAPolicy
    from vitavla.student import ActionMapper, VLAStudent

    torch.manual_seed(0)
    # Default RobotSpec: 6 arm + binary gripper state and 7 actions, the layout of both envs used here.
    student = VLAStudent(InternVLBackbone(path="tiny", tokens_per_image=4, image_size=224)).eval()
    head = ActionHead(32, student.robot.arm_dim, student.robot.gripper_dim)
    return StreamingPolicy(VLAPolicy(student, ActionMapper(student.hidden_size, 32), head).eval())


def make_env(args):
    if args.env == "standin":
        return functools.partial(ScriptedStandInEnv, num_task=1, steps=args.max_steps, image_size=64,
                                 sim_cost_ms=args.sim_cost_ms, speed=0.0)  # speed 0: never succeeds early
    from vitavla.rollout.libero_env import LiberoEnv

    return functools.partial(LiberoEnv, suite=args.suite, render_size=args.render_size,
                             max_steps=args.max_steps, gripper_state="binary")


def run(args) -> None:
    torch.set_num_threads(1)
    factory = make_env(args)
    env = factory()
    policy = tiny_random_policy()
    image_size = policy.image_size
    specs = [EpisodeSpec(0, e % 50, seed=7) for e in range(args.episodes)]
    rows = []

    # Sequential, in this process (the simulator is created by a warm-up episode, untimed).
    run_episode(env, policy, FirstActionExecutor(), specs[0], image_size=image_size)
    start = time.perf_counter()
    sim = pol = 0.0
    for s in specs:
        r = run_episode(env, policy, FirstActionExecutor(), s, image_size=image_size)
        sim, pol = sim + r.seconds_sim, pol + r.seconds_policy
        assert r.error is None, r.error
    rows.append(("sequential", 1, time.perf_counter() - start, 0.0, sim, pol))
    env.close()

    for n in args.workers:
        t0 = time.perf_counter()
        with EnvPool(factory, n) as pool:
            started = time.perf_counter() - t0
            run_wave(pool, policy, specs[:n], FirstActionExecutor, image_size=image_size)  # warm-up: sims
            warm = time.perf_counter() - t0
            start = time.perf_counter()
            sim = pol = 0.0
            for i in range(0, len(specs), n):
                for r in run_wave(pool, policy, specs[i:i + n], FirstActionExecutor, image_size=image_size):
                    assert r.error is None, r.error
                    sim, pol = sim + r.seconds_sim, pol + r.seconds_policy
            rows.append((f"pool {n}", n, time.perf_counter() - start, (started, warm), sim, pol))

    base = rows[0][2]
    print(f"\nenv={args.env} episodes={args.episodes} max_steps={args.max_steps} cores={os.cpu_count()} "
          f"policy threads={torch.get_num_threads()}"
          + (f" sim_cost_ms={args.sim_cost_ms}" if args.env == "standin" else f" render={args.render_size}"))
    print(f"{'run':<11}{'N':>3}{'wall s':>9}{'eps/hour':>10}{'vs 1':>7}{'goal 0.8N':>10}{'sim s/ep':>10}"
          f"{'pol s/ep':>10}  start/warm s")
    for name, n, wall, startup, sim, pol in rows:
        speed = base / wall
        st = "" if not startup else f"{startup[0]:.1f} / {startup[1]:.1f}"
        print(f"{name:<11}{n:>3}{wall:>9.2f}{3600 * args.episodes / wall:>10.0f}{speed:>6.2f}x"
              f"{speed / (0.8 * n):>9.2f}x{sim / args.episodes:>10.3f}{pol / args.episodes:>10.3f}  {st}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", choices=("standin", "libero"), default="standin")
    p.add_argument("--episodes", type=int, default=16, help="timed episodes per row")
    p.add_argument("--max-steps", type=int, default=20, help="policy steps per episode")
    p.add_argument("--workers", type=int, nargs="*", default=None,
                   help="pool sizes to time (default: 1 and the usable cores, at most 8)")
    p.add_argument("--sim-cost-ms", type=float, default=20.0, help="standin: CPU ms burnt per env step")
    p.add_argument("--suite", default="libero_10")
    p.add_argument("--render-size", type=int, default=64)
    args = p.parse_args(argv)
    if args.workers is None:
        n = min(default_workers(), 8)
        args.workers = sorted({1, n})
    if any(n < 1 for n in args.workers) or args.episodes < max(args.workers):
        p.error("--workers must be >= 1 and --episodes at least the largest pool")
    np.random.seed(0)
    run(args)


if __name__ == "__main__":
    main()
