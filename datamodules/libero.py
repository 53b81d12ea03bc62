"""LIBERO demonstration HDF5 files (the original 128px release and the 256px "no-noops" regenerations).

One file per task, ``<task>_demo.hdf5``, with ``data/demo_N/{actions, obs/...}`` (the layout of LIBERO's
robomimic-style datasets, Liu et al. 2023, https://github.com/Lifelong-Robot-Learning/LIBERO).
:class:`LiberoReader` indexes a suite directory (or a list of files), checks every demo's layout once, and reads frame ranges lazily; :class:`LiberoDataModule`
plugs it into the shared windowing of :mod:`datamodules.base`.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from datamodules.base import DataError, Episode, EpisodeReader, Frames, WindowDataModule
from vitavla.batch import RobotSpec
from vitavla.layouts import LIBERO_GRIPPER_ACTIONS, LIBERO_GRIPPER_STATES

GRIPPER_STATES, GRIPPER_ACTIONS = LIBERO_GRIPPER_STATES, LIBERO_GRIPPER_ACTIONS  # shared with LiberoEnv
IMAGE_KEYS = ("agentview_rgb", "eye_in_hand_rgb")
"""Static (third-person) view first, wrist view second: the order of Window.images."""
ACTION_DIM = 7
DEMO = re.compile(r"demo_(\d+)")


def instruction_from_filename(path: str | Path) -> str:
    """``KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5`` -> ``turn on the stove`` (Seer's converter rule)."""
    name = Path(path).name
    for suffix in (".hdf5", ".h5"):
        name = name.removesuffix(suffix)
    name = name.removesuffix("_demo")
    scene = re.search(r"SCENE\d+_", name)
    if scene:
        name = name[scene.end():]
    return name.replace("_", " ").strip().lower()


def _is_float(ds: h5py.Dataset) -> bool:
    return np.issubdtype(ds.dtype, np.floating)


class LiberoReader(EpisodeReader):
    """LIBERO ``*_demo.hdf5`` files; one episode per ``data/demo_N`` (key ``<file>:demo_N``).

    Conventions (the rollout side must build its observations and decode actions the same way; they are
    stored as ``robot``, ``gripper_range`` and ``gripper_convention``, and the last two travel in checkpoints
    through the fitted :class:`~vitavla.normalizer.Normalizer`):

    - **State** (``arm_dim`` 6): ``obs/ee_states`` (or ``obs/ee_pos`` + ``obs/ee_ori``) = end-effector
      position + **axis-angle**, as Seer's LIBERO training reads it (Seer's own eval feeds Euler angles here).
      Joint-space state is not offered: ``RobotSpec.arm_dim`` sizes state and action together, and LIBERO
      actions are 6-D end-effector deltas, so a 7-joint state would not fit the spec.
    - ``gripper_state="width"``: the 2 raw finger positions ``obs/gripper_states`` (``robot0_gripper_qpos``),
      ``RobotSpec(gripper_state="width", gripper_state_dim=2)``, Seer's ``--gripper_width``.
      ``"binary"``: the previous step's gripper command (the first step uses its own), 1.0 = open
      (raw command < 0), 0.0 = closed; ``RobotSpec(gripper_state="binary")``.
    - Actions are LIBERO's raw 7-D commands: 6 arm deltas (already scaled to about [-1, 1]; normalized with
      the fitted min/max or quantiles) + gripper (-1 open / +1 close). ``gripper_action="close_positive"``
      maps -1 -> target 0, +1 -> target 1 (1 = close; Seer's BCE target); ``"open_positive"`` maps +1 -> 0,
      -1 -> 1 (1 = open; OpenVLA's convention). Either way un-normalizing gives back the raw LIBERO command.
    - ``flip_images=True`` rotates both views by 180° (``img[::-1, ::-1]``) into the upright orientation of
      OpenVLA / OpenVLA-OFT / openpi, who flip renders the same way at eval. The default ``False`` keeps the
      simulator's native upside-down frames, as Seer does in training and eval.

    Demos shorter than ``min_length`` frames are skipped with a warning; empty demos and any other layout
    problem raise :class:`~datamodules.base.DataError`. Files are opened read-only, at indexing time briefly
    and then lazily once per process on the first read (h5py handles must not cross a fork).
    """

    def __init__(self, root: str | Path | Sequence[str | Path], gripper_state: str = "width",
                 gripper_action: str = "close_positive", flip_images: bool = False, action_chunk: int = 3,
                 min_length: int = 1):
        self._paths = self._resolve(root)
        self.root = Path(root) if isinstance(root, (str, Path)) else self._paths[0].parent
        if gripper_state not in GRIPPER_STATES:
            raise DataError(self.root, "gripper_state",
                            f"expected one of {GRIPPER_STATES}, got {gripper_state!r}")
        if gripper_action not in GRIPPER_ACTIONS:
            raise DataError(self.root, "gripper_action",
                            f"expected one of {tuple(GRIPPER_ACTIONS)}, got {gripper_action!r}")
        self.gripper_state, self.gripper_action, self.flip_images = gripper_state, gripper_action, flip_images
        low, high, self.gripper_convention = GRIPPER_ACTIONS[gripper_action]
        self.gripper_range = (low, high)
        if gripper_state == "width":
            self.robot = RobotSpec(gripper_state="width", gripper_state_dim=2, action_chunk=action_chunk)
        else:
            self.robot = RobotSpec(gripper_state="binary", action_chunk=action_chunk)
        self.episodes: list[Episode] = []
        self._locs: list[tuple[int, str, str]] = []  # (file index, demo name, "ee_states" or "ee_pos+ee_ori")
        skipped = []
        for f, path in enumerate(self._paths):
            for demo, length, ee, instruction in self._index_file(path):
                if length < min_length:
                    skipped.append(f"{path.name}:{demo} ({length} frames)")
                    continue
                self.episodes.append(Episode(f"{path}:{demo}", length, instruction,
                                             meta={"file": str(path), "demo": demo}))
                self._locs.append((f, demo, ee))
        if skipped:
            more = " ..." if len(skipped) > 10 else ""
            warnings.warn(f"LIBERO: skipped {len(skipped)} demo(s) shorter than {min_length} frames (one "
                          f"window without padding): {', '.join(skipped[:10])}{more}", stacklevel=2)
        if not self.episodes:
            raise DataError(self.root, "data/demo_*", f"no demo with at least {min_length} frames")
        self._pid: int | None = None
        self._handles: dict[int, h5py.File] = {}

    # -- indexing --------------------------------------------------------------------------------------
    @staticmethod
    def _resolve(root) -> list[Path]:
        if isinstance(root, (str, Path)):
            root = Path(root).expanduser()
            if root.is_dir():
                paths = sorted(root.glob("*.hdf5"))
                if not paths:
                    raise DataError(root, "*.hdf5", "a LIBERO suite directory with <task>_demo.hdf5 files; "
                                                    "found none")
                return paths
            roots = [root]
        else:
            roots = [Path(p).expanduser() for p in root]
        if not roots:
            raise DataError("<LiberoReader>", "root", "at least one *_demo.hdf5 file")
        for p in roots:
            if not p.is_file():
                raise DataError(p, "<file>", "an existing LIBERO *_demo.hdf5 file or suite directory")
        return roots

    @staticmethod
    def _open(path: Path) -> h5py.File:
        try:
            return h5py.File(path, "r")  # read-only: reading never modifies a dataset
        except OSError as e:
            raise DataError(path, "<file>",
                            f"a readable HDF5 file; h5py failed (truncated or corrupt?): {e}") from e

    def _index_file(self, path: Path) -> list[tuple[str, int, str, str]]:
        """(demo, length, ee layout, instruction) of each valid demo of a file, in numeric demo order."""
        with self._open(path) as h:
            try:
                if not isinstance(h.get("data"), h5py.Group):
                    raise DataError(path, "data", f"a 'data' group holding demo_N groups; top-level keys are "
                                                  f"{sorted(h.keys())}")
                data = h["data"]
                instruction = self._instruction(path, data)
                demos = sorted((k for k in data.keys() if DEMO.fullmatch(k)), key=lambda k: int(k[5:]))
                if not demos:
                    raise DataError(path, "data", f"demo_N groups; found keys {sorted(data.keys())[:10]}")
                for d in demos:
                    if not isinstance(data[d], h5py.Group):
                        raise DataError(path, f"data/{d}", "a group with actions and obs/")
                return [(d, *self._check_demo(path, d, data[d]), instruction) for d in demos]
            except OSError as e:  # metadata of a truncated file can fail after a successful open
                raise DataError(path, "data", f"readable HDF5 metadata; h5py failed: {e}") from e

    @staticmethod
    def _instruction(path: Path, data: h5py.Group) -> str:
        raw = data.attrs.get("problem_info")
        if raw is None:
            return instruction_from_filename(path)
        try:
            info = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(path, "data.attrs['problem_info']",
                            f"a JSON object with language_instruction: {e}") from e
        text = info.get("language_instruction") if isinstance(info, dict) else None
        return text.strip() if isinstance(text, str) and text.strip() else instruction_from_filename(path)

    def _check_demo(self, path: Path, demo: str, g) -> tuple[int, str]:
        """Validate one demo's layout from metadata only (no array is read) and return (length, ee layout)."""
        where = f"data/{demo}"

        def get(key: str, alternatives: str = "") -> h5py.Dataset:
            ds = g.get(key)
            if not isinstance(ds, h5py.Dataset):
                raise DataError(path, f"{where}/{key}", f"missing dataset{alternatives}")
            return ds

        actions = get("actions")
        if actions.ndim != 2 or actions.shape[1] != ACTION_DIM or not _is_float(actions):
            raise DataError(path, f"{where}/actions", f"float (T, {ACTION_DIM}) (6 arm deltas + gripper), "
                                                      f"got {actions.dtype} {actions.shape}")
        length = actions.shape[0]
        if length == 0:
            raise DataError(path, f"{where}/actions", "a non-empty demo, got 0 frames")
        streams = {"actions": actions}
        for key in IMAGE_KEYS:
            img = streams[key] = get(f"obs/{key}")
            if img.dtype != np.uint8 or img.ndim != 4 or img.shape[3] != 3 or 0 in img.shape[1:3]:
                raise DataError(path, f"{where}/obs/{key}",
                                f"uint8 images (T, H, W, 3), got {img.dtype} {img.shape}")
        obs = g.get("obs")
        if isinstance(obs.get("ee_states"), h5py.Dataset):
            ee, low_dim = "ee_states", {"ee_states": 6}
        elif isinstance(obs.get("ee_pos"), h5py.Dataset) and isinstance(obs.get("ee_ori"), h5py.Dataset):
            ee, low_dim = "ee_pos+ee_ori", {"ee_pos": 3, "ee_ori": 3}
        else:
            raise DataError(path, f"{where}/obs/ee_states", "missing dataset (accepted: ee_states (T, 6), or "
                                                            "ee_pos (T, 3) + ee_ori (T, 3))")
        if self.gripper_state == "width":
            low_dim["gripper_states"] = 2
        for key, dim in low_dim.items():
            why = (" (needed by gripper_state='width'; 'binary' derives the state from the actions)"
                   if key == "gripper_states" else "")
            ds = streams[key] = get(f"obs/{key}", why)
            if ds.ndim != 2 or ds.shape[1] != dim or not _is_float(ds):
                raise DataError(path, f"{where}/obs/{key}", f"float (T, {dim}), got {ds.dtype} {ds.shape}")
        lengths = {k: v.shape[0] for k, v in streams.items()}
        if len(set(lengths.values())) > 1:
            raise DataError(path, where, f"every stream with the same length T, got {lengths}")
        return length, ee

    # -- reading ---------------------------------------------------------------------------------------
    def _file(self, f: int) -> h5py.File:
        # A handle opened before a DataLoader fork would be shared by every worker, which HDF5 does not
        # support: each process opens its own on first use and forgets the parent's.
        if self._pid != os.getpid():
            self._pid, self._handles = os.getpid(), {}
        if f not in self._handles:
            self._handles[f] = self._open(self._paths[f])
        return self._handles[f]

    def __getstate__(self) -> dict:
        # Spawned workers get a pickled reader: open handles cannot travel (and must not).
        state = self.__dict__.copy()
        state["_pid"], state["_handles"] = None, {}
        return state

    def close(self) -> None:
        """Close this process's handles (the next read reopens them)."""
        if self._pid == os.getpid():
            for h in self._handles.values():
                h.close()
        self._handles = {}

    def _finite(self, arr: np.ndarray, index: int, key: str, start: int) -> np.ndarray:
        bad = ~np.isfinite(arr)
        if bad.any():
            row = start + int(np.argwhere(bad)[0][0])
            f, demo, _ = self._locs[index]
            raise DataError(self._paths[f], f"data/{demo}/{key}",
                            f"finite values, found NaN/inf at frame {row}")
        return arr

    def read(self, index: int, start: int, stop: int) -> Frames:
        f, demo, ee = self._locs[index]
        path, length = self._paths[f], self.episodes[index].length
        if not 0 <= start < stop <= length:
            raise DataError(path, f"data/{demo}",
                            f"a frame range inside [0, {length}), got [{start}, {stop})")
        key = f"data/{demo}"
        try:
            g = self._file(f)[key]
            views = []
            for view in IMAGE_KEYS:
                key = f"data/{demo}/obs/{view}"
                views.append(g["obs"][view][start:stop])
            key = f"data/{demo}/obs/{ee}"
            arm = (g["obs/ee_states"][start:stop] if ee == "ee_states"
                   else np.concatenate([g["obs/ee_pos"][start:stop], g["obs/ee_ori"][start:stop]], axis=1))
            arm = self._finite(arm, index, f"obs/{ee}", start)
            key = f"data/{demo}/actions"
            # One extra leading action for the binary state: the gripper state of frame t is command t-1.
            first = max(start - 1, 0) if self.gripper_state == "binary" else start
            actions = self._finite(g["actions"][first:stop], index, "actions", first)
            if self.gripper_state == "width":
                key = f"data/{demo}/obs/gripper_states"
                grip = self._finite(g["obs/gripper_states"][start:stop], index, "obs/gripper_states", start)
            else:
                command = actions[:, -1:]
                previous = command[:-1] if start > 0 else np.concatenate([command[:1], command[:-1]])
                grip = (previous < 0).astype(np.float32)  # LIBERO: -1 = open -> state 1.0 = open
                actions = actions[start - first:]
        except OSError as e:
            raise DataError(path, key, f"readable data, h5py failed (truncated or corrupt file?): {e}") from e
        if self.flip_images:
            # 180° rotation; copied so the arrays own contiguous memory like unflipped reads.
            views = [np.ascontiguousarray(v[:, ::-1, ::-1]) for v in views]
        return Frames(static=views[0], wrist=views[1],
                      state=np.concatenate([arm, grip], axis=1).astype(np.float32),
                      action=actions.astype(np.float32))

    @property
    def cache_key(self) -> str:
        # The gripper map is a convention, not a statistic: cached statistics must not outlive a change of it.
        return f"gripper_action={self.gripper_action}"

    def all_actions(self, episodes: Sequence[int] | None = None) -> np.ndarray:
        wanted = set(range(len(self._locs))) if episodes is None else set(episodes)
        # Opened and closed here rather than through _file: the main process then holds no handle when the
        # DataLoader forks its workers.
        out = []
        for f, path in enumerate(self._paths):
            with self._open(path) as h:
                for i, (f_i, demo, _) in enumerate(self._locs):
                    if f_i != f or i not in wanted:
                        continue
                    try:
                        a = h[f"data/{demo}/actions"][()]
                    except OSError as e:
                        raise DataError(path, f"data/{demo}/actions",
                                        f"readable data, h5py failed: {e}") from e
                    out.append(self._finite(a, i, "actions", 0))
        return np.concatenate(out).astype(np.float64)

    def files(self) -> list[Path]:
        return list(self._paths)


class LiberoDataModule(WindowDataModule):
    """Windows over a LIBERO suite (the original release or a no-noops regeneration), split by demo.

    Args:
        root: a suite directory of ``<task>_demo.hdf5`` files, or one such file.
        num_steps: steps ``T`` per window (Seer's LIBERO history: 7).
        image_size: side of the square uint8 images the model reads (both views are resized in the workers).
        batch_size, num_workers: DataLoader settings.
        normalization: ``minmax`` (default) or ``quantile`` (1%/99%) statistics of the arm actions.
        stats_cache_dir: where fitted statistics are cached as JSON.
        gripper_state, gripper_action, flip_images: conventions, see :class:`LiberoReader`.
        pad_tail: ``True`` starts a window at every frame and pads past a demo's end; ``False`` keeps only
            full windows and skips (with a warning) demos too short for one.
        val_fraction, seed: share of demos held out for validation, and the split's seed.
        normalize_state: standardise the state (mean 0, std 1 per value, from the training demos) before the
            model reads it; the statistics travel in the checkpoint's normalizer, so rollouts do the same.
            Off by default: released teachers (Seer) were trained on raw states.
        cache_frames: decode every frame of both splits once, in the main process, and hold them in RAM
            (shared with forked workers). For datasets that fit in memory: steps then read no file.
    """

    def __init__(self, root: str, num_steps: int = 7, image_size: int = 224, batch_size: int = 8,
                 num_workers: int = 4, normalization: str = "minmax",
                 stats_cache_dir: str = "~/.cache/vitavla", gripper_state: str = "width",
                 gripper_action: str = "close_positive", flip_images: bool = False, pad_tail: bool = True,
                 val_fraction: float = 0.05, seed: int = 0, normalize_state: bool = False,
                 cache_frames: bool = False):
        super().__init__(num_steps=num_steps, image_size=image_size, batch_size=batch_size,
                         num_workers=num_workers, normalization=normalization,
                         stats_cache_dir=stats_cache_dir, pad_tail=pad_tail, val_fraction=val_fraction,
                         seed=seed, normalize_state=normalize_state, cache_frames=cache_frames)
        # Configuration mistakes fail here, before any file is touched.
        if gripper_state not in GRIPPER_STATES:
            raise DataError(root, "gripper_state", f"expected one of {GRIPPER_STATES}, got {gripper_state!r}")
        if gripper_action not in GRIPPER_ACTIONS:
            raise DataError(root, "gripper_action",
                            f"expected one of {tuple(GRIPPER_ACTIONS)}, got {gripper_action!r}")
        self.save_hyperparameters()
        self.root, self.gripper_state, self.gripper_action = root, gripper_state, gripper_action
        self.flip_images = flip_images
        self._shared_reader: LiberoReader | None = None

    def make_reader(self, split: str) -> LiberoReader:
        # One reader for both splits (indexing opens every file once); split_episodes picks the demos.
        if self._shared_reader is None:
            chunk = RobotSpec().action_chunk
            self._shared_reader = LiberoReader(
                self.root, gripper_state=self.gripper_state, gripper_action=self.gripper_action,
                flip_images=self.flip_images, action_chunk=chunk,
                min_length=1 if self.pad_tail else self.num_steps + chunk - 1)
        return self._shared_reader


__all__ = ["LiberoReader", "LiberoDataModule", "instruction_from_filename"]
