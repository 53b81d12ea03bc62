"""One AdamW step (and the gradient-norm clip the teacher adds) of the quickstart's models on the CPU: torch's
default per-tensor loop against its foreach and fused kernels. One run, ratios against the default.

    python benchmarks/optimizer_step.py
    python benchmarks/optimizer_step.py --steps 300 --threads 2

The models are built from configs/quickstart/*.yaml exactly as training builds them (random weights, no data
read); gradients are random. `OptimConfig.fused` (vitavla/modules/common.py) turns the fused kernel on by
default on the CPU, which is where these numbers come from.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {
    "teacher (Seer)": ["--config", "configs/quickstart/teacher.yaml"],
    "student stage 2": ["--config", "configs/quickstart/finetune.yaml", "--model.init_args.init_mode=only_finetune",
                        "--model.init_args.init_from=null", "--model.init_args.teacher.init_args.init=random"],
}
KERNELS = {"per-tensor (torch's CPU default)": {"foreach": False}, "foreach": {"foreach": True},
           "fused": {"fused": True}}


def build(args: list[str]) -> list[torch.nn.Parameter]:
    import cli

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        c = cli.build_cli([*args, "--data.init_args.root=/nonexistent", "--trainer.logger=false"], run=False)
    return [p for p in c.model.parameters() if p.requires_grad]


def per_step_ms(fn, steps: int) -> float:
    for _ in range(5):
        fn()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) / steps * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="timed steps per kernel")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.steps} steps each")
    for name, cfg in MODELS.items():
        params = build(cfg)
        gen = torch.Generator().manual_seed(0)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        n = sum(p.numel() for p in params)
        print(f"\n{name}: {len(params)} tensors, {n:,} trained parameters")
        times = {}
        for kernel, kw in KERNELS.items():
            opt = torch.optim.AdamW(params, lr=1e-4, **kw)
            times[kernel] = per_step_ms(opt.step, args.steps)
        base = times["per-tensor (torch's CPU default)"]
        for kernel, ms in times.items():
            print(f"  AdamW {kernel:34s} {ms:7.2f} ms   {base / ms:5.2f}x")
        clip = per_step_ms(lambda: torch.nn.utils.clip_grad_norm_(params, 0.1), args.steps)
        print(f"  clip_grad_norm_ (teacher: max 0.1)       {clip:7.2f} ms")


if __name__ == "__main__":
    main()
