"""CALVIN chains per hour against the real simulator: in-process (today's ``num_envs: 1`` path) vs an EnvPool
of 1 and N simulator processes with batched policy calls, measured in one run, plus what that makes a full
1000-chain evaluation cost.

    python benchmarks/calvin_parallel.py --chains 8 --ep-len 40 --workers 1 2

Needs calvin_env and calvin_models (docs/evaluation.md). The policy is a randomly initialised tiny student,
so every chain fails its first subtask after ``--ep-len`` steps: each chain costs exactly ``ep_len`` steps
and the rows compare like for like. Simulator start (worker spawn, PyBullet scene load) happens in an
untimed warm-up wave and is reported apart.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from vitavla.rollout.calvin_env import CalvinSimEnv, load_chains
from vitavla.rollout.calvin_protocol import EP_LEN, run_chain_attempt, run_chain_wave
from vitavla.rollout.executors import FirstActionExecutor
from vitavla.rollout.parallel import EnvPool

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: its sibling's policy builder
from rollout_parallel import tiny_random_policy  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "calvin" / "official_chains_first20.json"


def run(args) -> None:
    torch.set_num_threads(1)
    chains = load_chains(args.chain_file)[: args.chains]
    env = CalvinSimEnv(None)
    policy = tiny_random_policy()
    size = policy.image_size
    kw = dict(ep_len=args.ep_len, image_size=size)
    rows = []

    run_chain_attempt(env, policy, chains[0], 0, env.oracle, env.instructions, ep_len=2, image_size=size)  # warm-up
    start, sim, pol, steps = time.perf_counter(), 0.0, 0.0, 0
    for i, chain in enumerate(chains):
        rec, _ = run_chain_attempt(env, policy, chain, i, env.oracle, env.instructions, **kw)
        assert rec["error"] is None, rec["error"]
        sim, pol, steps = sim + rec["seconds_sim"], pol + rec["seconds_policy"], steps + sum(rec["steps"])
    rows.append(("in-process", 1, time.perf_counter() - start, None, sim, pol, steps))
    env.close()

    for n in args.workers:
        t0 = time.perf_counter()
        with EnvPool(CalvinSimEnv(None), n) as pool:
            items = [(i, c, 0) for i, c in enumerate(chains)]
            run_chain_wave(pool, policy, items[:n], env.instructions, ep_len=2, image_size=size)  # warm-up
            warm = time.perf_counter() - t0
            start, sim, pol, steps = time.perf_counter(), 0.0, 0.0, 0
            for w in range(0, len(items), n):
                for rec, _ in run_chain_wave(pool, policy, items[w:w + n], env.instructions,
                                             executor_factory=FirstActionExecutor, **kw):
                    assert rec["error"] is None, rec["error"]
                    sim, pol, steps = sim + rec["seconds_sim"], pol + rec["seconds_policy"], steps + sum(rec["steps"])
            rows.append((f"pool {n}", n, time.perf_counter() - start, warm, sim, pol, steps))

    base = rows[0][2]
    print(f"\nreal CALVIN (scene D, no dataset), {len(chains)} chains x {args.ep_len} steps, cores={os.cpu_count()}, "
          "tiny random policy")
    print(f"{'run':<12}{'N':>3}{'wall s':>9}{'chains/h':>10}{'steps/s':>9}{'vs in-proc':>11}{'sim s/step':>12}"
          f"{'pol s/step':>12}  warm-up s")
    for name, n, wall, warm, sim, pol, steps in rows:
        print(f"{name:<12}{n:>3}{wall:>9.1f}{3600 * len(chains) / wall:>10.0f}{steps / wall:>9.1f}"
              f"{base / wall:>10.2f}x{sim / steps:>12.3f}{pol / steps:>12.3f}  {'' if warm is None else f'{warm:.1f}'}")
    best = min(rows, key=lambda r: r[2])
    per_step = best[2] / best[6]
    print(f"\nfull evaluation, 1000 chains, at {per_step * 1000:.0f} ms per step ({best[0]}): a policy that fails "
          f"every first subtask runs 1000 x {EP_LEN} steps = {1000 * EP_LEN * per_step / 3600:.1f} h; one that "
          f"completes all 5 subtasks in ~60 steps each runs ~300 steps per chain = "
          f"{1000 * 300 * per_step / 3600:.1f} h (simulation and tiny policy only)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chains", type=int, default=8, help="timed chains per row")
    p.add_argument("--ep-len", type=int, default=40, help="steps per subtask (CALVIN: 360)")
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="pool sizes to time")
    p.add_argument("--chain-file", default=str(FIXTURE), help="chains JSON (default: the first 20 official)")
    args = p.parse_args(argv)
    if any(n < 1 for n in args.workers) or args.chains < max(args.workers):
        p.error("--workers must be >= 1 and --chains at least the largest pool")
    run(args)


if __name__ == "__main__":
    main()
