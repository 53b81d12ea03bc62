"""LeRobotDataset v3 test data: a writer of small datasets in the published layout (frames whose
shifts and camera swaps show) and a reader over them; shared by the LeRobot test files."""

from __future__ import annotations

import numpy as np

from datamodules.lerobot import LeRobotReader
from datamodules.lerobot_write import LeRobotWriter, VideoOptions

LOSSLESS = VideoOptions(vcodec="libx264rgb", pix_fmt="rgb24", crf=0)
H264 = VideoOptions(vcodec="libx264", pix_fmt="yuv420p", crf=10)
AV1 = VideoOptions(vcodec="libsvtav1", pix_fmt="yuv420p", crf=10)
CAMS = ("top", "wrist")
ALOHA_COLUMNS = [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 6, 13]  # left 6, right 6, left gripper, right gripper
FPS = 10


def frames(t: int, hw=(32, 48), seed: int = 0, cam: int = 0) -> np.ndarray:
    """Smooth colour ramps that move with the frame and differ per camera (so swaps and shifts show)."""
    yy, xx = np.mgrid[: hw[0], : hw[1]]
    out = np.empty((t, *hw, 3), np.uint8)
    for i in range(t):
        out[i, ..., 0] = (xx * 150 // hw[1] + 9 * i + 7 * seed) % 256
        out[i, ..., 1] = yy * 150 // hw[0] + 40 * cam
        out[i, ..., 2] = 60 + 30 * cam + 5 * seed
    return out


def write(root, lengths=(7, 9, 8), width=7, video=LOSSLESS, per_file=2, tasks=None,
          hw=(32, 48)) -> list[dict]:
    """Episodes with smooth state/action vectors; ``per_file`` episodes share a parquet file and an mp4."""
    w = LeRobotWriter(root, FPS, width, width, list(CAMS), robot_type="piper", video=video,
                      episodes_per_file=per_file)
    out = []
    for e, t in enumerate(lengths):
        rng = np.random.default_rng(e)
        state = (np.sin(0.3 * np.arange(t)[:, None] + np.arange(width)) + rng.normal(0, 0.01, (t, width)))
        action = state + rng.normal(0, 0.05, state.shape)
        ep = {"state": state.astype(np.float32), "action": action.astype(np.float32),
              "images": {c: frames(t, hw, e, i) for i, c in enumerate(CAMS)},
              "task": (tasks or ["pick up the cup", "open the drawer", "pick up the cup"])[e]}
        w.add_episode(ep["state"], ep["action"], ep["images"], ep["task"])
        out.append(ep)
    w.finish()
    return out


def reader(root, **kw) -> LeRobotReader:
    return LeRobotReader(root, static_camera="top", wrist_camera="wrist", **kw)
