"""Frames of a LeRobotDataset v3 camera: where an episode lies in a shared mp4 (:class:`VideoSpan`), a check
that the file opens at the dataset's fps (:func:`probe_video`), and decoding by timestamp with a per-process
cache of open files (:class:`VideoDecoder`). Used by :class:`datamodules.lerobot.LeRobotReader`."""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datamodules.lerobot_format import INFO, bad_data, lerobot_deps


@dataclass
class VideoSpan:
    """One episode's part of a camera's mp4: frame ``t`` is shown at ``from_ts + timestamp[t]``."""

    path: Path
    from_ts: float
    to_ts: float


def probe_video(path: Path, cam: str, fps: float) -> float:
    """The video's end time in seconds; checks it opens and plays at ``fps`` (meta/info.json's)."""
    _, av = lerobot_deps()
    if not path.is_file():
        bad_data(path, cam, "missing video file named by meta/episodes")
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                bad_data(path, cam, "no video stream")
            s = c.streams.video[0]
            rate = s.average_rate or s.base_rate
            if rate is not None and abs(float(rate) - fps) > 1e-3 * fps:
                bad_data(path, cam, f"fps mismatch: the video plays at {float(rate):g} fps, {INFO} says {fps:g}")
            if s.duration is not None:
                return float((s.start_time or 0) * s.time_base + s.duration * s.time_base)
            return float(c.duration or 0) / av.time_base
    except av.error.FFmpegError as e:
        bad_data(path, cam, f"cannot open the video (corrupt mp4?): {e}")


class VideoDecoder:
    """Decodes frames by timestamp, keeping the ``max_open`` most recently used files open per process.

    ``tolerance_s``: largest allowed distance between a decoded frame's time and the time asked for.
    """

    def __init__(self, tolerance_s: float, max_open: int = 64):
        self.tolerance_s, self.max_open = float(tolerance_s), int(max_open)
        self._containers: dict[int, OrderedDict] = {}

    def _container(self, path: Path):
        # Decoder state must not cross a fork: each worker process opens its own containers, and keeps the
        # most recently used ones open (a large dataset has more mp4s than a process may hold files).
        _, av = lerobot_deps()
        mine = self._containers.setdefault(os.getpid(), OrderedDict())
        if path in mine:
            mine.move_to_end(path)
            return mine[path]
        try:
            mine[path] = av.open(str(path))
        except av.error.FFmpegError as e:
            bad_data(path, "<file>", f"cannot open the video (corrupt mp4?): {e}")
        while len(mine) > self.max_open:
            mine.popitem(last=False)[1].close()
        return mine[path]

    def open_files(self) -> int:
        """Files this process holds open."""
        return len(self._containers.get(os.getpid(), ()))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_containers"] = {}  # spawned workers get the reader pickled; open containers do not pickle
        return state

    def close(self) -> None:
        for c in self._containers.pop(os.getpid(), {}).values():
            c.close()

    def decode(self, video: VideoSpan, cam: str, times: np.ndarray) -> np.ndarray:
        """Frames (n, H, W, 3) uint8 shown at ``from_ts + times`` (increasing, seconds)."""
        _, av = lerobot_deps()
        tol = self.tolerance_s
        c = self._container(video.path)
        s = c.streams.video[0]
        want = video.from_ts + np.asarray(times, dtype=np.float64)
        out: list[np.ndarray | None] = [None] * len(want)
        tb = float(s.time_base)
        try:
            # Seek to the keyframe at or before the first frame (one tick earlier guards rounding), decode on.
            c.seek(max(int(math.floor(want[0] / tb)) - 1, 0), stream=s, backward=True, any_frame=False)
            i = 0
            for fr in c.decode(s):
                if fr.pts is None:
                    continue
                t = fr.pts * tb
                if i < len(want) and t > want[i] + tol:
                    bad_data(video.path, cam, f"no frame at {want[i]:.6f} s (next decoded frame at {t:.6f} s); "
                                           f"the video and meta/episodes timestamps disagree")
                if i < len(want) and abs(t - want[i]) <= tol:
                    out[i] = fr.to_ndarray(format="rgb24")
                    i += 1
                    while i < len(want) and abs(t - want[i]) <= tol:  # repeated request
                        out[i] = out[i - 1]
                        i += 1
                if i == len(want):
                    break
        except av.error.FFmpegError as e:
            bad_data(video.path, cam, f"cannot decode frames at {want[0]:.4f}..{want[-1]:.4f} s "
                                   f"(corrupt mp4?): {e}")
        if i < len(want):
            bad_data(video.path, cam, f"video shorter than its episode: no frame at {want[i]:.6f} s")
        return np.stack(out)
