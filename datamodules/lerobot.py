"""LeRobotDataset v3 (``codebase_version: "v3.0"``), read with pyarrow and PyAV (no lerobot package needed).

Layout (what :class:`LeRobotReader` reads and :mod:`datamodules.lerobot_write` writes):

- ``meta/info.json``: ``fps``, ``features`` (name -> dtype/shape/names; cameras have dtype ``video``),
  ``data_path`` / ``video_path`` templates (``data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet``,
  ``videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4``), ``chunks_size``, totals.
- ``meta/tasks.parquet``: one row per task, column ``task_index`` and the task text (column ``task``, the
  pandas index lerobot writes).
- ``meta/episodes/chunk-*/file-*.parquet``: one row per episode: ``episode_index``, ``length``, ``tasks``,
  ``dataset_from_index``/``dataset_to_index`` (global frame rows), ``data/chunk_index``/``data/file_index``,
  and per camera ``videos/<cam>/chunk_index``/``file_index``/``from_timestamp``/``to_timestamp``.
- ``data/chunk-*/file-*.parquet``: one row per frame: ``index``, ``episode_index``, ``frame_index``,
  ``timestamp`` (seconds from the episode start), ``task_index``, and the vector features
  (``observation.state``, ``action``, ...).
- ``videos/<cam>/chunk-*/file-*.mp4``: many episodes one after another; frame ``t`` of an episode is the frame
  shown at ``from_timestamp + timestamp[t]``.
- ``meta/stats.json``: dataset statistics per feature; read only with ``use_stats_json=True``.

Everything except the pixels is indexed and validated when the reader is built (low-dim arrays stay in memory,
as in :mod:`datamodules.aloha`); frames are decoded on demand, by timestamp, seeking to the keyframe at or
before the first one asked for. Open containers are cached per process.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from datamodules.base import Episode, EpisodeReader, Frames, WindowDataModule
from datamodules.lerobot_format import (EPISODE_COLUMNS, EPISODES_DIR, INDEX_COLUMNS, INFO, STATS, TASKS,
                                        VIDEO_COLUMNS, bad_data, column_matrix, lerobot_deps, read_parquet,
                                        scalar_column)
from datamodules.lerobot_video import VideoDecoder, VideoSpan, probe_video
from datamodules.resumable import ResumableLoader
from vitavla.batch import RobotSpec
from vitavla.normalizer import Normalizer

GRIPPER_CONVENTION = "gripper target 0 = raw {low}, 1 = raw {high}"


@dataclass
class _Source:
    data_file: Path
    state: np.ndarray  # (T, state_dim) float32, reordered to (arm..., gripper...)
    action: np.ndarray  # (T, action_dim) float32, raw units, reordered
    timestamp: np.ndarray  # (T,) float64, seconds from the episode start
    videos: tuple[VideoSpan, VideoSpan]  # static, wrist


class LeRobotReader(EpisodeReader):
    """Episodes of a LeRobotDataset v3 directory.

    Args:
        root: the dataset directory (holding ``meta/``, ``data/``, ``videos/``).
        static_camera: feature key of the third-person view, e.g. ``observation.images.top``; a bare camera
            name (``top``) means ``observation.images.top``.
        wrist_camera: feature key of the wrist view (same rules). May equal ``static_camera`` for a dataset
            with one camera.
        arm_dim: arm values in state and action (6 for a PiPer or SO-100 arm, 12 for bimanual ALOHA).
        action_columns: the action vector's columns in the order (arm..., grippers...); default: as stored.
            ALOHA stores ``[left 6 joints, left gripper, right 6 joints, right gripper]``, which is
            ``[0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 6, 13]``. The values after ``arm_dim`` are the grippers.
        state_columns: the same for the state vector (default: ``action_columns`` when the widths agree,
            else as stored).
        gripper_state: ``"width"``: the gripper state values are fed to the model as recorded (any number);
            ``"binary"``: one open (1) / closed (0) flag per gripper, one-hot encoded by the models (CALVIN,
            LIBERO ``gripper_state="binary"`` conversions).
        state_key, action_key: feature names of the state and action vectors.
        gripper_range: raw (target 0, target 1) gripper action values; default the data's min/max per gripper.
        gripper_convention: what gripper target 1 means, kept in checkpoints (e.g. ``"1 = open"``).
        tolerance_s: largest allowed distance between a frame's expected and actual time (timestamps against
            ``frame_index / fps``, and decoded video frames against the timestamp asked for).
        action_chunk: future actions per step (``RobotSpec.action_chunk``).
    """

    def __init__(self, root: str | Path, static_camera: str = "observation.images.top",
                 wrist_camera: str = "observation.images.wrist", arm_dim: int = 6,
                 action_columns: Sequence[int] | None = None, state_columns: Sequence[int] | None = None,
                 state_key: str = "observation.state", action_key: str = "action",
                 gripper_range: Sequence[float] | None = None, gripper_convention: str = "",
                 gripper_state: str = "width", tolerance_s: float = 1e-4, action_chunk: int = 3):
        self.root = Path(root).expanduser()
        self.static_camera, self.wrist_camera = _camera_key(static_camera), _camera_key(wrist_camera)
        self.state_key, self.action_key, self.tolerance_s = state_key, action_key, float(tolerance_s)
        if gripper_range is not None and len(gripper_range) != 2:
            bad_data(self.root, "gripper_range", f"expected [target-0 value, target-1 value], "
                                              f"got {gripper_range!r}")
        self.gripper_range = tuple(float(v) for v in gripper_range) if gripper_range is not None else None
        info = self._info()
        self.info, self.fps = info, float(info["fps"])
        features = info["features"]
        action_width = self._vector_width(features, action_key)
        state_width = self._vector_width(features, state_key)
        self.action_columns = self._columns(action_columns, action_width, "action_columns")
        if state_columns is None and action_columns is not None and state_width == action_width:
            state_columns = action_columns
        self.state_columns = self._columns(state_columns, state_width, "state_columns")
        n_grip, n_grip_state = len(self.action_columns) - arm_dim, len(self.state_columns) - arm_dim
        if arm_dim < 1 or n_grip < 1 or n_grip_state < 1:
            bad_data(self.root / INFO, "arm_dim",
                  f"arm_dim={arm_dim} must leave at least one gripper value in the action "
                  f"({len(self.action_columns)} columns) and the state ({len(self.state_columns)} columns)")
        if gripper_state not in ("width", "binary"):
            bad_data(self.root, "gripper_state", f"expected 'width' or 'binary', got {gripper_state!r}")
        if gripper_state == "binary" and n_grip_state != n_grip:
            bad_data(self.root / INFO, "gripper_state", f"'binary' needs one state value per gripper "
                                                     f"({n_grip}); the state has {n_grip_state} after "
                                                     f"arm_dim={arm_dim}")
        self.robot = RobotSpec(arm_dim=arm_dim, gripper_dim=n_grip, gripper_state=gripper_state,
                               gripper_state_dim=n_grip_state if gripper_state == "width" else None,
                               action_chunk=action_chunk)
        low, high = self.gripper_range or ("data min", "data max")
        self.gripper_convention = gripper_convention or GRIPPER_CONVENTION.format(low=low, high=high)
        for cam in (self.static_camera, self.wrist_camera):
            ft = features.get(cam)
            if not isinstance(ft, dict) or ft.get("dtype") != "video":
                cams = sorted(k for k, v in features.items()
                              if isinstance(v, dict) and v.get("dtype") == "video")
                bad_data(self.root / INFO, f"features.{cam}", f"not a video feature; video features: {cams} "
                                                           f"(set static_camera/wrist_camera)")
        tasks = self._tasks()
        self._sources: list[_Source] = []
        self.episodes: list[Episode] = []
        self._index(tasks)
        self.decoder = VideoDecoder(self.tolerance_s)

    # -- metadata ---------------------------------------------------------------------------------
    def _info(self) -> dict:
        if not self.root.is_dir():
            bad_data(self.root, "root", "not a directory (expected a LeRobot v3 dataset with meta/info.json)")
        path = self.root / INFO
        if not path.is_file():
            bad_data(path, INFO, "missing meta file; a LeRobot v3 dataset has meta/info.json, "
                              "meta/tasks.parquet and meta/episodes/")
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            bad_data(path, INFO, f"not valid JSON: {e}")
        version = str(info.get("codebase_version", ""))
        if not version.startswith("v3"):
            bad_data(path, "codebase_version", f"is {version!r}; only LeRobotDataset v3.x is read here (convert "
                                            f"v2.1 with lerobot's convert_dataset_v21_to_v30)")
        for key, kind in (("fps", (int, float)), ("features", dict), ("data_path", str), ("video_path", str)):
            if not isinstance(info.get(key), kind) or (key == "fps" and not info[key] > 0):
                bad_data(path, key, f"missing or invalid ({info.get(key)!r}); expected a "
                                 f"{'positive number' if key == 'fps' else kind.__name__}")
        return info

    def _vector_width(self, features: dict, key: str) -> int:
        ft = features.get(key)
        shape = ft.get("shape") if isinstance(ft, dict) else None
        if not (isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int)):
            bad_data(self.root / INFO, f"features.{key}", f"missing or not a vector feature (shape [d]); "
                                                       f"features: {sorted(features)}")
        return shape[0]

    def _columns(self, columns, width: int, name: str) -> list[int]:
        if columns is None:
            return list(range(width))
        cols = [int(c) for c in columns]
        if not cols or min(cols) < 0 or max(cols) >= width or len(set(cols)) != len(cols):
            bad_data(self.root / INFO, name, f"{cols} must be distinct column numbers in [0, {width})")
        return cols

    def _tasks(self) -> dict[int, str]:
        path = self.root / TASKS
        if not path.is_file():
            bad_data(path, TASKS, "missing meta file (one row per task: task_index and the task text)")
        table = read_parquet(path)
        text_col = next((c for c in ("task", "__index_level_0__") if c in table.column_names), None)
        if "task_index" not in table.column_names or text_col is None:
            bad_data(path, "task_index" if text_col else "task", f"columns task_index and task expected; found "
                                                              f"{table.column_names}")
        return dict(zip(scalar_column(table, "task_index").tolist(), table.column(text_col).to_pylist()))

    def _episode_rows(self) -> list[tuple[Path, dict]]:
        folder = self.root / EPISODES_DIR
        files = sorted(folder.glob("chunk-*/file-*.parquet"))
        if not files:
            bad_data(folder, EPISODES_DIR, "missing meta files (expected "
                                        "meta/episodes/chunk-000/file-000.parquet)")
        cams = dict.fromkeys((self.static_camera, self.wrist_camera))
        need = [*EPISODE_COLUMNS, *(f"videos/{c}/{k}" for c in cams for k in VIDEO_COLUMNS)]
        rows = []
        for f in files:
            table = read_parquet(f, need)
            cols = {k: table.column(k).to_pylist() for k in need}
            rows.extend((f, {k: cols[k][i] for k in need}) for i in range(table.num_rows))
        rows.sort(key=lambda r: r[1]["episode_index"])
        return rows

    # -- indexing ---------------------------------------------------------------------------------
    def _index(self, tasks: dict[int, str]) -> None:
        rows = self._episode_rows()
        data: dict[Path, dict] = {}
        probed: dict[Path, float] = {}
        seen_data_episodes: dict[Path, set] = {}
        for meta_file, ep in rows:
            e = int(ep["episode_index"])
            data_file = self.root / self.info["data_path"].format(chunk_index=ep["data/chunk_index"],
                                                                  file_index=ep["data/file_index"])
            if data_file not in data:
                data[data_file] = self._load_data(data_file)
                seen_data_episodes[data_file] = set()
            d = data[data_file]
            lo, hi, length = int(ep["dataset_from_index"]), int(ep["dataset_to_index"]), int(ep["length"])
            if hi - lo != length or length < 1:
                bad_data(meta_file, "length", f"episode {e}: length {length} but dataset_from_index.."
                                           f"dataset_to_index is {lo}..{hi}")
            # Rows by global index, found by binary search (a file can hold thousands of episodes).
            order, sorted_index = d["order"], d["sorted_index"]
            rows_of = order[np.searchsorted(sorted_index, lo):np.searchsorted(sorted_index, hi)]
            ep_col = d["episode_index"][rows_of]
            if len(rows_of) != length or (ep_col != e).any():
                found = sorted(set(ep_col.tolist()))
                bad_data(data_file, "episode_index", f"rows with index {lo}..{hi} belong to episodes {found}, "
                                                  f"{len(rows_of)} rows; {meta_file.relative_to(self.root)} "
                                                  f"says episode {e} with {length} frames")
            seen_data_episodes[data_file].add(e)
            self._check_frames(data_file, e, d, rows_of)
            task = tasks.get(int(d["task_index"][rows_of[0]]))
            if task is None:
                bad_data(data_file, "task_index", f"episode {e}: task_index {int(d['task_index'][rows_of[0]])} "
                                               f"is not in {TASKS} (task indices: {sorted(tasks)})")
            videos = tuple(self._video(meta_file, ep, e, cam, length, probed)
                           for cam in (self.static_camera, self.wrist_camera))
            state = d[self.state_key][rows_of][:, self.state_columns].astype(np.float32)
            action = d[self.action_key][rows_of][:, self.action_columns].astype(np.float32)
            self._sources.append(_Source(data_file, state, action, d["timestamp"][rows_of], videos))
            self.episodes.append(Episode(key=f"episode {e}", length=length, instruction=task,
                                         meta={"episode_index": e, "data_file": str(data_file)}))
        for data_file, d in data.items():
            extra = sorted(set(d["episode_index"].tolist()) - seen_data_episodes[data_file])
            if extra:
                bad_data(data_file, "episode_index", f"holds episodes {extra[:10]} that no "
                                                  f"{EPISODES_DIR}/*.parquet row lists")
        if not self.episodes:
            bad_data(self.root / EPISODES_DIR, "episode_index", "no episodes")

    def _load_data(self, path: Path) -> dict:
        """One data parquet file's columns, checked against info.json's features."""
        pq, _ = lerobot_deps()
        if not path.is_file():
            bad_data(path, "data_path", "missing data file named by meta/episodes")
        try:
            names = pq.read_schema(path).names
        except Exception as e:  # pyarrow raises several types for a damaged file
            bad_data(path, "<file>", f"not a readable parquet file: {e}")
        features = self.info["features"]
        for key, ft in features.items():
            if isinstance(ft, dict) and ft.get("dtype") not in ("video",) and key not in names:
                bad_data(path, key, f"feature named in {INFO} is not a column of this file; columns: {names}")
        table = read_parquet(path, [*INDEX_COLUMNS, *dict.fromkeys((self.state_key, self.action_key))])
        out = {k: scalar_column(table, k) for k in INDEX_COLUMNS}
        out["timestamp"] = out["timestamp"].astype(np.float64)
        out["order"] = np.argsort(out["index"], kind="stable")
        out["sorted_index"] = out["index"][out["order"]]
        for key in (self.state_key, self.action_key):
            m = column_matrix(table, path, key, features[key]["shape"][0])
            bad = ~np.isfinite(m)
            if bad.any():
                r, c = np.argwhere(bad)[0]
                bad_data(path, key, f"NaN/inf at episode {int(out['episode_index'][r])} frame "
                                 f"{int(out['frame_index'][r])} column {c}; expected finite values")
            out[key] = m
        return out

    def _check_frames(self, path: Path, e: int, d: dict, rows: np.ndarray) -> None:
        frame, ts = d["frame_index"][rows], d["timestamp"][rows]
        if not np.array_equal(frame, np.arange(len(rows))):
            at = int(np.flatnonzero(frame != np.arange(len(rows)))[0])
            bad_data(path, "frame_index", f"episode {e}: row {at} has frame_index {int(frame[at])}; "
                                       f"expected 0, 1, 2, ... in index order")
        if len(ts) > 1 and (np.diff(ts) <= 0).any():
            at = int(np.flatnonzero(np.diff(ts) <= 0)[0]) + 1
            bad_data(path, "timestamp", f"episode {e}: timestamps out of order at frame {at} "
                                     f"({ts[at - 1]:.6f} s then {ts[at]:.6f} s); expected strictly "
                                     f"increasing")
        off = np.abs(ts - frame / self.fps)
        if (off > self.tolerance_s).any():
            at = int(np.flatnonzero(off > self.tolerance_s)[0])
            bad_data(path, "timestamp", f"episode {e}: frame {at} at {ts[at]:.6f} s but frame_index / fps = "
                                     f"{frame[at] / self.fps:.6f} s (fps {self.info['fps']} in {INFO}); fps "
                                     f"mismatch between {INFO} and the recorded timestamps")

    def _video(self, meta_file: Path, ep: dict, e: int, cam: str, length: int, probed: dict) -> VideoSpan:
        path = self.root / self.info["video_path"].format(
            video_key=cam, chunk_index=ep[f"videos/{cam}/chunk_index"],
            file_index=ep[f"videos/{cam}/file_index"])
        start, stop = float(ep[f"videos/{cam}/from_timestamp"]), float(ep[f"videos/{cam}/to_timestamp"])
        if path not in probed:
            probed[path] = probe_video(path, cam, self.fps)
        end = probed[path]
        # The last frame of the episode is shown at start + (length - 1) / fps and lasts one frame period.
        need = start + length / self.fps
        if end + self.tolerance_s < need or stop + self.tolerance_s < need:
            bad_data(path, cam, f"video shorter than its episode: episode {e} ({length} frames at "
                             f"{self.info['fps']} fps from {start:.4f} s) needs {need:.4f} s, the video ends "
                             f"at {end:.4f} s (to_timestamp {stop:.4f} s in "
                             f"{meta_file.relative_to(self.root)})")
        return VideoSpan(path, start, stop)

    # -- reading ----------------------------------------------------------------------------------
    def close(self) -> None:
        self.decoder.close()

    def read(self, index: int, start: int, stop: int) -> Frames:
        src = self._sources[index]
        if not 0 <= start < stop <= len(src.state):
            bad_data(src.data_file, "frame_index", f"a frame range inside [0, {len(src.state)}), "
                                                f"got [{start}, {stop})")
        times = src.timestamp[start:stop]
        static = self.decoder.decode(src.videos[0], self.static_camera, times)
        wrist = (static if self.wrist_camera == self.static_camera
                 else self.decoder.decode(src.videos[1], self.wrist_camera, times))
        return Frames(static=static, wrist=wrist, state=src.state[start:stop], action=src.action[start:stop])

    # -- contract ---------------------------------------------------------------------------------
    def all_actions(self, episodes: Sequence[int] | None = None) -> np.ndarray:
        ids = range(len(self._sources)) if episodes is None else episodes
        return np.concatenate([self._sources[i].action for i in ids])

    def all_states(self, episodes: Sequence[int] | None = None) -> np.ndarray:
        ids = range(len(self._sources)) if episodes is None else episodes
        return np.concatenate([self._sources[i].state for i in ids]).astype(np.float64)

    def files(self) -> list[Path]:
        # Statistics depend on the frames' numbers only, not on the videos.
        return sorted({s.data_file for s in self._sources} | {self.root / INFO})

    @property
    def cache_key(self) -> str:
        return (f"state={self.state_key}{self.state_columns}|action={self.action_key}{self.action_columns}|"
                f"arm={self.robot.arm_dim}|gripper_range={self.gripper_range}|"
                f"gripper_state={self.robot.gripper_state}")

    def stats_normalizer(self, mode: str, normalize_state: bool) -> Normalizer:
        """A normalizer from ``meta/stats.json`` (all episodes, as lerobot computed them) instead of a fit."""
        path = self.root / STATS
        if not path.is_file():
            bad_data(path, STATS, "missing meta file (use_stats_json=True reads it)")
        try:
            stats = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            bad_data(path, STATS, f"not valid JSON: {e}")
        lo_key, hi_key = ("q01", "q99") if mode == "quantile" else ("min", "max")

        def get(feature: str, stat: str, cols: list[int]) -> np.ndarray:
            value = (stats.get(feature) or {}).get(stat)
            arr = np.asarray(value, dtype=np.float64).reshape(-1) if value is not None else None
            if arr is None or len(arr) != self._vector_width(self.info["features"], feature):
                bad_data(path, f"{feature}.{stat}", f"missing or not a vector of the feature's width "
                                                 f"({'quantile' if mode == 'quantile' else 'minmax'} "
                                                 f"normalization reads it)")
            return arr[cols]

        arm = self.robot.arm_dim
        lo = get(self.action_key, lo_key, self.action_columns)
        hi = get(self.action_key, hi_key, self.action_columns)
        if self.gripper_range is None:
            g_lo = get(self.action_key, "min", self.action_columns)[arm:]
            g_hi = get(self.action_key, "max", self.action_columns)[arm:]
        else:
            g_lo = np.full(self.robot.gripper_dim, self.gripper_range[0])
            g_hi = np.full(self.robot.gripper_dim, self.gripper_range[1])
        norm = Normalizer(lo[:arm].tolist(), hi[:arm].tolist(), g_lo.tolist(), g_hi.tolist(), mode=mode,
                          gripper_convention=self.gripper_convention, meta={"source": STATS})
        if normalize_state:
            mean = get(self.state_key, "mean", self.state_columns)
            std = np.maximum(get(self.state_key, "std", self.state_columns), 1e-3)
            if self.robot.gripper_state == "binary":  # flags stay 0/1: the models threshold them at 0.5
                mean[arm:], std[arm:] = 0.0, 1.0
            norm = Normalizer(**{**norm.state_dict(), "state_mean": mean.tolist(), "state_std": std.tolist()})
        return norm


class _ForkSafeLoader(DataLoader):
    """A DataLoader whose workers never inherit an open video container.

    A worker forked while the parent process held open FFmpeg containers (the parent had decoded windows
    itself, e.g. with num_workers=0 or in a check) died of SIGSEGV on its first decode; the parent closes its
    containers just before the workers start and reopens them on its next read.
    """

    def _get_iterator(self):
        if self.num_workers > 0:
            self.dataset.reader.close()
        return super()._get_iterator()


class _ForkSafeResumableLoader(_ForkSafeLoader, ResumableLoader):
    """The training loader: resumable (its state goes into the checkpoint) and fork-safe."""


def _camera_key(name: str) -> str:
    return name if "." in name else f"observation.images.{name}"


class LeRobotDataModule(WindowDataModule):
    """Windows of a LeRobotDataset v3 directory; see :class:`LeRobotReader` for the layout options.

    Episodes are split by a seeded hold-out of ``val_fraction``; the action normalizer is fitted on the
    training episodes (cached under ``stats_cache_dir``). ``use_stats_json=True`` takes it from the
    dataset's ``meta/stats.json`` instead (lerobot computes those over every episode, the hold-out included).

    Args:
        root: dataset directory (``meta/info.json`` inside).
        static_camera: feature key (or bare camera name) of the third-person view.
        wrist_camera: feature key (or bare camera name) of the wrist view.
        arm_dim: arm values in state and action (6 PiPer single arm, 12 ALOHA bimanual).
        action_columns: action columns in (arm..., grippers...) order; default as stored.
        state_columns: state columns in (arm..., grippers...) order; default ``action_columns`` when the
            widths agree.
        state_key: the state feature.
        action_key: the action feature.
        gripper_range: raw gripper actions mapped to targets 0 and 1; default the training data's min/max.
        gripper_convention: what gripper target 1 means (stored in checkpoints).
        gripper_state: ``width`` (gripper state as recorded) or ``binary`` (one open/closed flag per gripper).
        use_stats_json: normalize with ``meta/stats.json`` (min/max, or q01/q99 for ``quantile``) instead of
            statistics fitted on the training split.
        tolerance_s: allowed timestamp deviation in seconds.
        cache_frames: decode every frame once and hold it in RAM (small datasets; no video decode per step).
    """

    def __init__(self, root: str, static_camera: str = "observation.images.top",
                 wrist_camera: str = "observation.images.wrist", arm_dim: int = 6,
                 action_columns: list[int] | None = None, state_columns: list[int] | None = None,
                 state_key: str = "observation.state", action_key: str = "action",
                 gripper_range: list[float] | None = None, gripper_convention: str = "",
                 gripper_state: str = "width", use_stats_json: bool = False, tolerance_s: float = 1e-4,
                 num_steps: int = 7, image_size: int = 224, batch_size: int = 8, num_workers: int = 4,
                 normalization: str = "minmax", stats_cache_dir: str = "~/.cache/vitavla",
                 pad_tail: bool = True, val_fraction: float = 0.1, seed: int = 0,
                 normalize_state: bool = False, cache_frames: bool = False):
        super().__init__(num_steps=num_steps, image_size=image_size, batch_size=batch_size,
                         num_workers=num_workers, normalization=normalization,
                         stats_cache_dir=stats_cache_dir, pad_tail=pad_tail, val_fraction=val_fraction,
                         seed=seed, normalize_state=normalize_state, cache_frames=cache_frames)
        self.root, self.use_stats_json = root, use_stats_json
        self.reader_options = dict(root=root, static_camera=static_camera, wrist_camera=wrist_camera,
                                   arm_dim=arm_dim, action_columns=action_columns,
                                   state_columns=state_columns,
                                   state_key=state_key, action_key=action_key, gripper_range=gripper_range,
                                   gripper_convention=gripper_convention, gripper_state=gripper_state,
                                   tolerance_s=tolerance_s, action_chunk=RobotSpec().action_chunk)
        self._shared: LeRobotReader | None = None

    def make_reader(self, split: str) -> LeRobotReader:
        if self._shared is None:  # one directory serves both splits; index it once
            self._shared = LeRobotReader(**self.reader_options)
        return self._shared

    def _loader(self, ds, shuffle: bool):
        loader = super()._loader(ds, shuffle)
        # The base's loader as built (same arguments), plus closing this process's containers before the
        # workers fork (see _ForkSafeLoader); _ForkSafeLoader adds no state, only that one override.
        resumable = isinstance(loader, ResumableLoader)
        loader.__class__ = _ForkSafeResumableLoader if resumable else _ForkSafeLoader
        return loader

    def fit_normalizer(self, reader: LeRobotReader) -> Normalizer:
        if self.use_stats_json:
            return reader.stats_normalizer(self.normalization, self.normalize_state)
        return super().fit_normalizer(reader)


__all__ = ["LeRobotReader", "LeRobotDataModule"]
