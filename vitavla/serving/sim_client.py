"""A simulator driven through ``vitavla serve``: the whole deployment path (export, server, openpi client,
chunked or ensembled execution, robot units) tested without hardware.

    vitavla serve policies/libero --port 8000 &
    python -m vitavla.serving.sim_client --port 8000 --suite libero_object --tasks 0 1 --episodes 2

Episodes run through :func:`vitavla.rollout.runner.run_episode` (the loop ``vitavla test`` uses: reset,
settle steps, success, frames) with a :class:`RemoteController` in place of the in-process policy, so a
served policy and the same policy in ``vitavla test`` act identically (tested on the stand-in env).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from vitavla.rollout.env import Obs, RolloutEnv
from vitavla.rollout.episode import EpisodeResult, EpisodeSpec
from vitavla.rollout.runner import run_episode
from vitavla.serving.client import ChunkController, EnsembleController


class RemoteController:
    """The runner's controller interface over a policy server: env :class:`Obs` -> openpi observation ->
    robot-unit action. One instance per episode stream (its client connection is one server session)."""

    def __init__(self, controller: ChunkController | EnsembleController):
        self.controller = controller
        self.keys = controller.meta["obs_keys"]
        self.seconds = 0.0

    @property
    def queries(self) -> int:
        return self.controller.queries

    def reset(self) -> None:
        self.controller.reset()

    def act(self, t: int, obs: Obs, instruction: str | None = None) -> np.ndarray:
        start = time.perf_counter()
        k = self.keys
        action = self.controller.act({
            k["views"][0]: obs.static, k["views"][1]: obs.wrist, k["state"]: obs.state,
            k["prompt"]: obs.instruction if instruction is None else instruction})
        self.seconds += time.perf_counter() - start
        return action


def run_remote_episode(env: RolloutEnv, controller: RemoteController, spec: EpisodeSpec,
                       settle_steps: int = 0, record_frames: bool = False) -> EpisodeResult:
    """One episode of ``env`` with actions from the server behind ``controller``."""
    if controller.controller.meta.get("action_dim") != env.action_dim:
        raise ValueError(f"the served policy predicts {controller.controller.meta.get('action_dim')} action "
                         f"values, {type(env).__name__} takes {env.action_dim}")
    return run_episode(env, None, None, spec, settle_steps=settle_steps, record_frames=record_frames,
                       controller=controller)


def main(argv: list[str] | None = None) -> None:
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    from vitavla.rollout.libero_env import LiberoEnv

    ap = argparse.ArgumentParser(description="Drive LIBERO episodes through a `vitavla serve` policy server.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--token", default=None)
    ap.add_argument("--suite", default="libero_object")
    ap.add_argument("--protocol", default="seer", help="LiberoEnv protocol (settle steps, image flips)")
    ap.add_argument("--gripper-state", default="binary", choices=["binary", "width"],
                    help="state layout the policy was trained on")
    ap.add_argument("--tasks", type=int, nargs="+", default=[0])
    ap.add_argument("--episodes", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--mode", choices=["chunk", "ensemble"], default="ensemble")
    args = ap.parse_args(argv)

    env = LiberoEnv(suite=args.suite, protocol=args.protocol, gripper_state=args.gripper_state,
                    max_steps=args.max_steps)
    policy = WebsocketClientPolicy(args.host, args.port, api_key=args.token)
    ctl = RemoteController(EnsembleController(policy) if args.mode == "ensemble" else ChunkController(policy))
    wins = runs = 0
    try:
        for task in args.tasks:
            for ep in range(args.episodes):
                res = run_remote_episode(env, ctl, EpisodeSpec(task, ep))  # LiberoEnv settles in reset()
                runs += res.error is None
                wins += bool(res.success)
                print(f"task {task} episode {ep}: success={res.success} steps={res.steps} error={res.error}")
    finally:
        env.close()
    print(f"{wins}/{runs} successful episodes ({ctl.queries} server queries)")


if __name__ == "__main__":
    main()
