"""Write LeRobotDataset v3 (the layout :mod:`datamodules.lerobot` reads), and ``vitavla data convert``.

:class:`LeRobotWriter` takes whole episodes (state, action, frames per camera, task text) and writes
``data/``, ``videos/`` and ``meta/`` with lerobot's column names and path templates. Episodes are appended
to one parquet file and one mp4 per camera until ``episodes_per_file`` is reached, then the next
``file-NNN`` (and ``chunk-NNN`` after ``chunks_size`` files) starts, as lerobot rolls files over by size.
Everything is written into ``<out>.partial`` and renamed to ``<out>`` when complete, so an interrupted
conversion never leaves a dataset that looks whole.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from datamodules.base import DataError, EpisodeReader
from datamodules.lerobot_format import EPISODES_DIR, INFO, STATS, TASKS, lerobot_deps

CODEBASE_VERSION = "v3.0"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = EPISODES_DIR + "/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"


@dataclass
class VideoOptions:
    """How camera streams are encoded. lerobot's default is AV1 (libsvtav1, yuv420p, GOP 2, CRF 30)."""

    vcodec: str = "libsvtav1"
    """Encoder; ``libx264`` for H.264, ``libx264rgb`` (with ``pix_fmt: rgb24``, ``crf: 0``) for lossless."""
    pix_fmt: str = "yuv420p"
    gop: int = 2
    """Keyframe interval: a random window seeks to a keyframe and decodes at most ``gop - 1`` extra frames."""
    crf: int = 30
    extra: dict[str, str] = field(default_factory=dict)

    def options(self) -> dict[str, str]:
        opts = {"g": str(self.gop), "crf": str(self.crf), **self.extra}
        if self.vcodec == "libsvtav1":
            opts.setdefault("svtav1-params", "log-level=1")  # the encoder's banner is not our output
        return opts


def default_video_options() -> VideoOptions:
    """lerobot's AV1 when this PyAV can encode it, else H.264."""
    _, av = lerobot_deps()
    return VideoOptions() if "libsvtav1" in av.codecs_available else VideoOptions(vcodec="libx264")


class _VideoFile:
    """One mp4 being written: frames of consecutive episodes on one timeline."""

    def __init__(self, path: Path, fps: int, height: int, width: int, opts: VideoOptions):
        _, av = lerobot_deps()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.fps, self.frames = path, fps, 0
        self.shape = (height, width)
        self.container = av.open(str(path), "w", format="mp4")
        self.stream = self.container.add_stream(opts.vcodec, rate=fps, options=opts.options())
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, opts.pix_fmt
        self.stream.codec_context.time_base = Fraction(1, fps)

    def add(self, frames: np.ndarray) -> tuple[float, float]:
        """Append (T, H, W, 3) uint8 frames; their (from_timestamp, to_timestamp) in this file."""
        _, av = lerobot_deps()
        if frames.shape[1:3] != self.shape:
            raise DataError(self.path, "frames", f"episode frames are {frames.shape[1:3]}, earlier episodes "
                                                 f"of this file {self.shape}; one video file holds one size")
        start = self.frames
        for img in frames:
            fr = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            fr.pts, fr.time_base = self.frames, Fraction(1, self.fps)
            self.container.mux(self.stream.encode(fr))
            self.frames += 1
        return start / self.fps, self.frames / self.fps

    def close(self) -> None:
        self.container.mux(self.stream.encode())
        self.container.close()


# lerobot reads tasks.parquet with pandas and looks tasks up by the frame's index label, so the task text
# must come back as the index: the metadata pandas itself writes for a frame indexed by "task".
_TASKS_PANDAS = {b"pandas": json.dumps({
    "index_columns": ["task"],
    "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
                        "metadata": {"encoding": "UTF-8"}}],
    "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
                 "numpy_type": "int64", "metadata": None},
                {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object",
                 "metadata": None}],
    "attributes": {}, "creator": {"library": "pyarrow", "version": "14.0.0"}, "pandas_version": "2.2.0",
}).encode()}


def _vector_stats(x: np.ndarray) -> dict:
    x = np.asarray(x, dtype=np.float64)
    q = {f"q{int(p * 100):02d}": np.quantile(x, p, axis=0).tolist() for p in (0.01, 0.10, 0.50, 0.90, 0.99)}
    return {"min": x.min(0).tolist(), "max": x.max(0).tolist(), "mean": x.mean(0).tolist(),
            "std": x.std(0).tolist(), "count": [int(len(x))], **q}


def _image_stats(frames: np.ndarray) -> dict:
    # lerobot keeps image statistics per channel, in [0, 1], shaped (3, 1, 1).
    x = frames.reshape(-1, 3).astype(np.float64) / 255.0
    shape = lambda v: [[[float(c)]] for c in v]  # noqa: E731
    return {"min": shape(x.min(0)), "max": shape(x.max(0)), "mean": shape(x.mean(0)), "std": shape(x.std(0)),
            "count": [int(len(frames))]}


class LeRobotWriter:
    """Writes a LeRobotDataset v3 directory.

    Args:
        out: the dataset directory to create (must not exist, or be empty).
        fps: frame rate of the recording (timestamps are ``frame_index / fps``).
        state_dim, action_dim: widths of ``observation.state`` and ``action``.
        cameras: camera names; their features are ``observation.images.<name>``.
        robot_type: free text stored in info.json.
        video: encoder settings (default: :func:`default_video_options`).
        episodes_per_file: episodes per data parquet / mp4 before the next file starts.
        chunks_size: files per ``chunk-NNN`` directory.
        state_names, action_names: per-column names stored in info.json features.
    """

    def __init__(self, out: str | Path, fps: int, state_dim: int, action_dim: int, cameras: list[str],
                 robot_type: str | None = None, video: VideoOptions | None = None,
                 episodes_per_file: int = 1000, chunks_size: int = 1000, state_names: list[str] | None = None,
                 action_names: list[str] | None = None):
        self.out = Path(out).expanduser()
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise DataError(self.out, "--out", "already exists and is not empty; choose a new directory")
        self.video = video or default_video_options()
        _, av = lerobot_deps()
        try:
            if av.codec.Codec(self.video.vcodec, "w").type != "video":
                raise ValueError("not a video codec")
        except (ValueError, av.error.FFmpegError) as e:
            raise DataError(self.out, "--vcodec", f"{self.video.vcodec!r} is not a video encoder of this "
                                                  f"PyAV ({e}); e.g. libsvtav1, libx264, libx264rgb") from e
        self.tmp = self.out.with_name(self.out.name + ".partial")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)  # leftover of an interrupted conversion
        self.tmp.mkdir(parents=True)
        self.fps, self.cameras = int(fps), list(cameras)
        self.episodes_per_file, self.chunks_size = int(episodes_per_file), int(chunks_size)
        self.robot_type = robot_type
        self.features = {
            "observation.state": {"dtype": "float32", "shape": [state_dim],
                                  "names": state_names or [f"state_{i}" for i in range(state_dim)]},
            "action": {"dtype": "float32", "shape": [action_dim],
                       "names": action_names or [f"action_{i}" for i in range(action_dim)]},
        }
        self.tasks: dict[str, int] = {}
        self.episodes: list[dict] = []
        self._rows: list[dict] = []  # per episode, the columns of the data file being filled
        self._videos: dict[str, _VideoFile] = {}
        self._file = (0, 0)  # (chunk_index, file_index) being filled
        self._in_file = 0
        self._frames = 0
        self._state, self._action = [], []
        self._image_stats: dict[str, list[dict]] = {c: [] for c in self.cameras}

    def add_episode(self, state: np.ndarray, action: np.ndarray, images: dict[str, np.ndarray],
                    task: str) -> None:
        """One episode: state (T, state_dim), action (T, action_dim), images camera -> (T, H, W, 3) uint8."""
        t = len(state)
        if t == 0 or len(action) != t or any(len(v) != t for v in images.values()):
            raise DataError(self.tmp, "episode", f"state, action and every camera need the same number "
                                                 f"(> 0) of frames; got {t}, {len(action)}, "
                                                 f"{ {k: len(v) for k, v in images.items()} }")
        if sorted(images) != sorted(self.cameras):
            raise DataError(self.tmp, "images", f"cameras {sorted(images)}; the writer was made for "
                                                f"{self.cameras}")
        if self._in_file == self.episodes_per_file:
            self._flush()
            chunk, file = self._file
            self._file = (chunk + 1, 0) if file + 1 == self.chunks_size else (chunk, file + 1)
            self._in_file = 0
        e = len(self.episodes)
        task_index = self.tasks.setdefault(task, len(self.tasks))
        chunk, file = self._file
        ep = {"episode_index": e, "tasks": [task], "length": t, "data/chunk_index": chunk,
              "data/file_index": file, "dataset_from_index": self._frames,
              "dataset_to_index": self._frames + t}
        for cam in self.cameras:
            key = f"observation.images.{cam}"
            frames = np.asarray(images[cam])
            if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
                raise DataError(self.tmp, key, f"expected uint8 (T, H, W, 3) frames, got {frames.dtype} "
                                               f"{frames.shape}")
            if cam not in self._videos:
                path = self.tmp / VIDEO_PATH.format(video_key=key, chunk_index=chunk, file_index=file)
                self._videos[cam] = _VideoFile(path, self.fps, *frames.shape[1:3], self.video)
                self.features.setdefault(key, self._video_feature(frames.shape[1:3]))
            start, stop = self._videos[cam].add(frames)
            ep.update({f"videos/{key}/chunk_index": chunk, f"videos/{key}/file_index": file,
                       f"videos/{key}/from_timestamp": start, f"videos/{key}/to_timestamp": stop})
            stats = _image_stats(frames)
            ep.update({f"stats/{key}/{k}": v for k, v in stats.items()})
            self._image_stats[cam].append(stats)
        state, action = np.asarray(state, np.float32), np.asarray(action, np.float32)
        for name, arr in (("observation.state", state), ("action", action)):
            ep.update({f"stats/{name}/{k}": v for k, v in _vector_stats(arr).items()})
        ep["meta/episodes/chunk_index"], ep["meta/episodes/file_index"] = 0, 0
        self._rows.append({"observation.state": state, "action": action,
                           "timestamp": (np.arange(t) / self.fps).astype(np.float32),
                           "frame_index": np.arange(t), "episode_index": np.full(t, e),
                           "index": self._frames + np.arange(t), "task_index": np.full(t, task_index)})
        self._state.append(state)
        self._action.append(action)
        self.episodes.append(ep)
        self._frames += t
        self._in_file += 1

    def _video_feature(self, hw) -> dict:
        return {"dtype": "video", "shape": [int(hw[0]), int(hw[1]), 3],
                "names": ["height", "width", "channels"],
                "info": {"video.height": int(hw[0]), "video.width": int(hw[1]),
                         "video.codec": self.video.vcodec, "video.pix_fmt": self.video.pix_fmt,
                         "video.fps": self.fps,
                         "video.channels": 3, "video.g": self.video.gop, "video.crf": self.video.crf,
                         "has_audio": False, "is_depth_map": False}}

    def _flush(self) -> None:
        """Close the data parquet and the mp4s being filled."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        for v in self._videos.values():
            v.close()
        self._videos = {}
        if not self._rows:
            return
        sd, ad = (self.features[k]["shape"][0] for k in ("observation.state", "action"))
        col = {k: np.concatenate([r[k] for r in self._rows]) for k in self._rows[0]}
        cols = {  # vectors as fixed-size lists, as lerobot's datasets.Sequence(length=d) features store them
            "observation.state": pa.FixedSizeListArray.from_arrays(col["observation.state"].reshape(-1), sd),
            "action": pa.FixedSizeListArray.from_arrays(col["action"].reshape(-1), ad),
            "timestamp": pa.array(col["timestamp"], pa.float32()),
            **{k: pa.array(col[k], pa.int64())
               for k in ("frame_index", "episode_index", "index", "task_index")},
        }
        path = self.tmp / DATA_PATH.format(chunk_index=self._file[0], file_index=self._file[1])
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols), path)
        self._rows = []

    def finish(self) -> Path:
        """Write the meta files and move the dataset into place; returns its directory."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.episodes:
            raise DataError(self.tmp, "episodes", "nothing to write: no episode was added")
        self._flush()
        (self.tmp / "meta").mkdir(parents=True, exist_ok=True)
        tasks = sorted(self.tasks.items(), key=lambda kv: kv[1])
        table = pa.table({"task_index": pa.array([i for _, i in tasks], pa.int64()),
                          "task": pa.array([t for t, _ in tasks], pa.string())})
        pq.write_table(table.replace_schema_metadata(_TASKS_PANDAS), self.tmp / TASKS)
        episodes = self.tmp / EPISODES_PATH.format(chunk_index=0, file_index=0)
        episodes.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(self.episodes), episodes)
        for name in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
            self.features[name] = {"dtype": "float32" if name == "timestamp" else "int64", "shape": [1],
                                   "names": None}
        info = {"codebase_version": CODEBASE_VERSION, "robot_type": self.robot_type,
                "total_episodes": len(self.episodes), "total_frames": self._frames,
                "total_tasks": len(self.tasks),
                "chunks_size": self.chunks_size, "data_files_size_in_mb": 100, "video_files_size_in_mb": 200,
                "fps": self.fps, "splits": {"train": f"0:{len(self.episodes)}"}, "data_path": DATA_PATH,
                "video_path": VIDEO_PATH, "features": self.features}
        (self.tmp / INFO).write_text(json.dumps(info, indent=4))
        stats = {"observation.state": _vector_stats(np.concatenate(self._state)),
                 "action": _vector_stats(np.concatenate(self._action))}
        for cam, per in self._image_stats.items():
            # Pool the per-episode statistics (weights: frames) into the dataset's.
            w = np.array([s["count"][0] for s in per], np.float64)
            means, stds = np.array([s["mean"] for s in per]), np.array([s["std"] for s in per])
            mean = np.tensordot(w, means, 1) / w.sum()
            var = np.tensordot(w, stds ** 2 + (means - mean) ** 2, 1) / w.sum()
            stats[f"observation.images.{cam}"] = {
                "min": np.min([s["min"] for s in per], 0).tolist(),
                "max": np.max([s["max"] for s in per], 0).tolist(),
                "mean": mean.tolist(), "std": np.sqrt(var).tolist(), "count": [int(w.sum())]}
        (self.tmp / STATS).write_text(json.dumps(stats, indent=4))
        if self.out.exists():
            self.out.rmdir()  # empty (checked in __init__)
        self.tmp.rename(self.out)
        return self.out


FPS = {"libero": 20, "aloha": 50, "calvin": 30}
"""Recording rates of the source formats (their files do not store one): LIBERO's 20 Hz control, ALOHA's
50 Hz, CALVIN's 30 Hz."""


def convert(reader: EpisodeReader, out: str | Path, fps: int, cameras: tuple[str, str] = ("static", "wrist"),
            video: VideoOptions | None = None, episodes_per_file: int = 1000, robot_type: str | None = None,
            log=print) -> Path:
    """Every episode of ``reader`` into a LeRobot v3 dataset at ``out``.

    State and action are written as the reader gives them (state: arm then gripper values; action: raw
    units), so reading the result with ``arm_dim = reader.robot.arm_dim`` gives back the same vectors. The
    two views become ``observation.images.<cameras[0]>`` and ``<cameras[1]>`` (one video when the names are
    equal and the views identical).
    """
    robot = reader.robot
    one_camera = cameras[0] == cameras[1]
    writer = LeRobotWriter(out, fps, robot.state_dim, robot.action_dim, list(dict.fromkeys(cameras)),
                           robot_type=robot_type, video=video, episodes_per_file=episodes_per_file,
                           state_names=[*(f"arm_{i}" for i in range(robot.arm_dim)),
                                        *(f"gripper_{i}" for i in range(robot.gripper_state_values))],
                           action_names=[*(f"arm_{i}" for i in range(robot.arm_dim)),
                                         *(f"gripper_{i}" for i in range(robot.gripper_dim))])
    try:
        for i, ep in enumerate(reader.episodes):
            fr = reader.read(i, 0, ep.length)
            if one_camera and not np.array_equal(fr.static, fr.wrist):
                raise DataError(ep.key, "cameras", f"both views are named {cameras[0]!r} but differ; name "
                                                   f"them apart")
            images = {cameras[0]: fr.static} if one_camera else {cameras[0]: fr.static, cameras[1]: fr.wrist}
            writer.add_episode(fr.state, fr.action, images, ep.instruction)
            log(f"  episode {i}: {ep.key} ({ep.length} frames) {ep.instruction!r}")
        return writer.finish()
    except BaseException:
        for v in writer._videos.values():
            v.container.close()
        shutil.rmtree(writer.tmp, ignore_errors=True)
        raise


def reader_options(reader: EpisodeReader, cameras: tuple[str, str]) -> dict:
    """The LeRobotDataModule options that read a converted dataset back as ``reader`` gave it."""
    opts = {"static_camera": cameras[0], "wrist_camera": cameras[1], "arm_dim": reader.robot.arm_dim}
    if reader.robot.gripper_state == "binary":
        opts["gripper_state"] = "binary"
    if getattr(reader, "gripper_range", None) is not None:
        opts["gripper_range"] = list(reader.gripper_range)
    if getattr(reader, "gripper_convention", ""):
        opts["gripper_convention"] = reader.gripper_convention
    return opts
