"""One LIBERO control step (physics plus the two policy cameras) at full render quality, with ``fast_render``
(no MSAA, shadows, reflections) and with ``fast_render`` plus ``mesh_lod`` (fewer triangles for render-only
meshes). One run, ratios against full quality, and how far each setting's frames are from full quality's.

    python benchmarks/render_lod.py
    python benchmarks/render_lod.py --size 128 --steps 60 --suite libero_object --task 3

Needs the libero extra (pip install -e '.[libero]'). Every setting replays the same actions from the same
init state, so the frames compare the same scene; the states are checked equal (rendering never touches
physics).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = {"full quality": {}, "fast_render": {"fast_render": True},
            "fast_render + mesh_lod": {"fast_render": True, "mesh_lod": True}}


def run(suite: str, task: int, size: int, steps: int, kwargs: dict):
    from vitavla.console import third_party_stderr, third_party_stdout
    from vitavla.rollout.libero_env import LiberoEnv

    with third_party_stdout(), third_party_stderr():
        env = LiberoEnv(suite, protocol="seer", render_size=size, max_steps=steps + 1, settle_steps=2,
                        flip_images=False, **kwargs)
    try:
        obs = env.reset(task, 0)
        faces = int(env._env.env.sim.model._model.mesh_facenum.sum())
        actions = np.zeros((steps, 7))
        actions[:, :3] = 0.3 * np.sin(np.arange(steps)[:, None] / 8.0 + np.arange(3))  # a slow wander
        actions[:, 6] = -1.0
        frames, states = [], []
        start = time.perf_counter()
        for a in actions:
            obs = env.step(a)[0]
            frames.append(np.stack([obs.static, obs.wrist]))
            states.append(obs.state)
        seconds = (time.perf_counter() - start) / steps
    finally:
        env.close()
    return seconds, faces, np.stack(frames).astype(np.int16), np.stack(states)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="libero_object")
    ap.add_argument("--task", type=int, default=0)
    ap.add_argument("--size", type=int, default=56, help="camera side in px (the quickstart's is 56)")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    results = {name: run(args.suite, args.task, args.size, args.steps, kw) for name, kw in SETTINGS.items()}
    base_s, _, base_frames, base_states = results["full quality"]
    print(f"{args.suite} task {args.task}, {args.size} px, two cameras, {args.steps} steps")
    print(f"{'setting':24s} {'ms/step':>8s} {'speed-up':>9s} {'triangles':>10s} {'mean |diff| vs full':>20s}")
    for name, (seconds, faces, frames, states) in results.items():
        if not np.array_equal(states, base_states):
            raise SystemExit(f"{name}: the states differ from full quality's (rendering changed physics)")
        diff = np.abs(frames - base_frames).mean()
        print(f"{name:24s} {seconds * 1e3:8.1f} {base_s / seconds:8.2f}x {faces:10,d} {diff:20.2f}")


if __name__ == "__main__":
    main()
