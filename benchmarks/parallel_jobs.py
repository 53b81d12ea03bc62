"""Stage-2 training steps of the quickstart's student on a CPU: one process with every thread, one with one
thread, and two one-thread processes side by side (what ``--jobs 2`` of ``vitavla quickstart`` and ``vitavla
evidence`` does). One run; the last line gives the steps per second of the two side by side against one
process with every thread.

    python benchmarks/parallel_jobs.py
    python benchmarks/parallel_jobs.py --steps 200 --batch-size 64

The model is built from configs/quickstart/finetune.yaml exactly as training builds it (random weights); the
batches are random windows of the quickstart's shapes (two 56 px views, one step, 3-action chunks), made once
before timing. A step is forward, the stage-2 loss, backward and the fused AdamW step.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARGS = ["--config", "configs/quickstart/finetune.yaml", "--model.init_args.init_mode=only_finetune",
        "--model.init_args.init_from=null", "--model.init_args.teacher.init_args.init=random",
        "--data.init_args.root=/nonexistent", "--trainer.logger=false"]
INSTRUCTIONS = ("pick up the alphabet soup and place it in the basket",
                "pick up the bbq sauce and place it in the basket")


def measure(threads: int, steps: int, batch_size: int, start=None) -> float:
    """ms per training step in this process with ``threads`` torch threads; ``start`` (a barrier) lines up
    processes that run side by side."""
    import torch

    import cli
    from vitavla.batch import Window
    from vitavla.losses import action_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        policy = cli.build_cli(ARGS, run=False).model.policy
    policy.train()
    robot = policy.robot
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    b, c = batch_size, robot.action_chunk
    batches = [Window(images=torch.randint(0, 256, (b, 1, 2, 3, 56, 56), dtype=torch.uint8),
                      instruction=[INSTRUCTIONS[i % 2] for i in range(b)],
                      state=torch.randn(b, 1, robot.state_dim), valid=torch.ones(b, 1, dtype=torch.bool),
                      actions=torch.cat([torch.rand(b, 1, c, robot.arm_dim) * 2 - 1,
                                         torch.randint(0, 2, (b, 1, c, robot.gripper_dim)).float()], -1),
                      action_valid=torch.ones(b, 1, c, dtype=torch.bool)) for _ in range(4)]

    def step(batch: Window) -> None:
        pred = policy(batch)
        loss, _ = action_loss(pred, batch.actions, batch.action_valid, robot, 1.0, "smooth_l1")
        opt.zero_grad()
        loss.backward()
        opt.step()

    for i in range(5):
        step(batches[i % 4])
    if start is not None:
        start.wait()
    t = time.perf_counter()
    for i in range(steps):
        step(batches[i % 4])
    return (time.perf_counter() - t) / steps * 1000


def _side_by_side(threads: int, steps: int, batch_size: int, start, results) -> None:
    results.put(measure(threads, steps, batch_size, start))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads of the one-process run")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")

    def alone(threads: int) -> float:
        results = ctx.Queue()
        p = ctx.Process(target=_side_by_side, args=(threads, args.steps, args.batch_size, None, results))
        p.start()
        ms = results.get()
        p.join()
        return ms

    every = alone(args.threads)
    one = alone(1)
    start, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_side_by_side, args=(1, args.steps, args.batch_size, start, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    pair = [results.get() for _ in procs]
    for p in procs:
        p.join()
    print(f"quickstart student, stage 2, batch {args.batch_size}, {args.steps} steps, {os.cpu_count()} cores")
    print(f"{'setting':40s} {'ms/step':>8s} {'steps/s':>8s}")
    print(f"{f'one process, {args.threads} threads':40s} {every:8.1f} {1000 / every:8.2f}")
    print(f"{'one process, 1 thread':40s} {one:8.1f} {1000 / one:8.2f}")
    both = sum(1000 / ms for ms in pair)
    print(f"{'two 1-thread processes side by side':40s} {max(pair):8.1f} {both:8.2f} (both together)")
    print(f"side by side / one process with {args.threads} threads: {both / (1000 / every):.2f}x the steps per second")


if __name__ == "__main__":
    main()
