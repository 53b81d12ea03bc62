"""Per-step latency of streaming inference (KV cache) vs recomputing the full window, history 1..N.

    python benchmarks/streaming_latency.py                 # tiny InternVL student on CPU
    python benchmarks/streaming_latency.py --family llava --tokens-per-image 49 --device cuda

"full" is what a policy without a cache does at every control step (Seer's and RoboVLMs' evaluation
wrappers do this): embed every frame of the history and run the language model over the whole window.
"cached" is :class:`vitavla.streaming.StreamingPolicy`: embed the new frame, run the new step's tokens
against the cache. Both are timed in this one run, so the printed ratio is like for like.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from teachers.base import ActionHead  # noqa: E402
from vitavla.batch import RobotSpec, fake_window  # noqa: E402
from vitavla.policy import VLAPolicy  # noqa: E402
from vitavla.streaming import Observation, StreamingPolicy  # noqa: E402
from vitavla.student import ActionMapper, VLAStudent  # noqa: E402


def build(family: str, tokens_per_image: int, image_size: int, history: int) -> VLAPolicy:
    if family == "internvl":
        from vitavla.backbones.internvl import InternVLBackbone as B
    else:
        from vitavla.backbones.llava import LlavaBackbone as B
    student = VLAStudent(B(path="tiny", tokens_per_image=tokens_per_image, image_size=image_size),
                         max_steps=history)
    head = ActionHead(384)
    return VLAPolicy(student, ActionMapper(student.hidden_size, 384), head).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="internvl", choices=["internvl", "llava"])
    ap.add_argument("--history", type=int, default=10)
    ap.add_argument("--tokens-per-image", type=int, default=49)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=5, help="episodes timed per mode (median taken)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    policy = build(args.family, args.tokens_per_image, args.image_size, args.history).to(device)
    w = fake_window(RobotSpec(), batch_size=1, num_steps=args.history, image_size=args.image_size)
    obs = [Observation(w.images[:, t], w.state[:, t], w.instruction) for t in range(args.history)]
    cached = {h: [] for h in range(1, args.history + 1)}
    full = {h: [] for h in range(1, args.history + 1)}
    stream = StreamingPolicy(policy)
    with torch.no_grad():
        for rep in range(args.repeats + 1):  # the first episode warms up allocators and kernels
            stream.reset()
            for t in range(args.history):
                sync(device)
                t0 = time.perf_counter()
                stream.step(Observation(obs[t].images.to(device), obs[t].state.to(device), obs[t].instruction))
                sync(device)
                t1 = time.perf_counter()
                policy(w.slice_steps(0, t + 1).to(device))
                sync(device)
                t2 = time.perf_counter()
                if rep:
                    cached[t + 1].append(t1 - t0)
                    full[t + 1].append(t2 - t1)
    print(f"family={args.family} tokens/image={args.tokens_per_image} image={args.image_size}px "
          f"device={device} threads={torch.get_num_threads()}")
    print(f"{'history':>7} {'cached ms':>10} {'full ms':>10} {'ratio':>7}")
    for h in range(1, args.history + 1):
        c, f = statistics.median(cached[h]) * 1e3, statistics.median(full[h]) * 1e3
        print(f"{h:>7} {c:>10.2f} {f:>10.2f} {f / c:>7.2f}")
    c, f = statistics.median(cached[args.history]), statistics.median(full[args.history])
    print(f"ratio at history {args.history}: {f / c:.2f}x (goal >= 5x)")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")
    print(f"peak host RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
