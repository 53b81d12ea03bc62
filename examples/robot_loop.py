"""A robot control loop against ``vitavla serve``: PiPer (6 joints + 1 gripper) or ALOHA (12 + 2).

    vitavla serve policies/piper --port 8000                    # on the GPU machine (or this one)
    python examples/robot_loop.py --robot piper --mode ensemble --hz 7 --steps 300
    python examples/robot_loop.py --robot aloha --mode chunk --chunk-steps 3 --host 10.0.0.5 --token $TOKEN

Needs only numpy and ``pip install --no-deps openpi-client`` (plus websockets, msgpack, dm-tree, pillow) on
the robot's computer. ``FakeRobot`` stands in for the hardware so the loop runs anywhere; replace it with
your driver: ``observe()`` returns the cameras (uint8 H x W x 3), the state in the layout the policy was
trained on (arm values, then the gripper values) and the instruction; ``apply(action)`` takes the robot-unit
action the server returned (arm values, then binary gripper commands).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitavla.serving.client import ChunkController, EnsembleController  # noqa: E402

ROBOTS = {
    # arm values, gripper values in the state (binary open/closed per gripper)
    "piper": (6, 1),
    "aloha": (12, 2),
}


class FakeRobot:
    """Random frames and a drifting state in the server's layout; prints what it would execute."""

    def __init__(self, meta: dict, robot: str, instruction: str, seed: int = 0):
        arm, grip = ROBOTS[robot]
        if (meta["robot"]["arm_dim"], meta["robot"]["gripper_dim"]) != (arm, grip):
            served = f"{meta['robot']['arm_dim']} + {meta['robot']['gripper_dim']}"
            raise SystemExit(f"the served policy is {served}, "
                             f"--robot {robot} is {arm} + {grip}")
        self.keys, self.instruction = meta["obs_keys"], instruction
        self.state = np.zeros(meta["state_dim"], np.float32)
        self.rng = np.random.default_rng(seed)

    def observe(self) -> dict:
        views = {k: self.rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for k in self.keys["views"]}
        return {**views, self.keys["state"]: self.state.copy(), self.keys["prompt"]: self.instruction}

    def apply(self, action: np.ndarray) -> None:
        self.state[: len(action)] += 0.01 * np.tanh(action[: len(self.state)])


def main(argv: list[str] | None = None) -> None:
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--robot", choices=sorted(ROBOTS), default="piper")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--token", default=None, help="the server's --token (sent as openpi's api_key)")
    ap.add_argument("--mode", choices=["chunk", "ensemble"], default="ensemble")
    ap.add_argument("--chunk-steps", type=int, default=None, help="chunk mode: actions executed per query")
    ap.add_argument("--hz", type=float, default=7.0, help="control rate (the paper's PiPer ran at 6-7 Hz)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--instruction", default="pick up the red block")
    args = ap.parse_args(argv)

    policy = WebsocketClientPolicy(args.host, args.port, api_key=args.token)
    ctl = EnsembleController(policy) if args.mode == "ensemble" else ChunkController(policy, args.chunk_steps)
    robot = FakeRobot(ctl.meta, args.robot, args.instruction)
    ctl.reset()
    period, late = 1.0 / args.hz, 0
    for t in range(args.steps):
        start = time.perf_counter()
        robot.apply(ctl.act(robot.observe()))
        spare = period - (time.perf_counter() - start)
        late += spare < 0
        time.sleep(max(0.0, spare))
    print(f"{args.steps} steps at {args.hz} Hz, {ctl.queries} server queries, {late} steps over budget")


if __name__ == "__main__":
    main()
