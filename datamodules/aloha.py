"""ACT / ALOHA episode HDF5 (also Mobile ALOHA, Cobot Magic and single-arm PiPer recordings in that layout).

One file ``episode_<i>.hdf5`` per demonstration, opened read-only:

- ``/observations/qpos`` (T, 14) float: per arm, left then right, 6 joints (rad) + gripper opening width.
  A (T, 7) array is a single-arm recording (the paper's PiPer: 6 joints + gripper width); it is read as
  ``arms="left"`` (the first and only arm) and refuses ``"right"``/``"both"``.
- ``/action`` (T, same width as qpos) float: absolute joint targets + gripper target.
- ``/observations/images/<cam>``: raw (T, H, W, 3) uint8, or JPEG bytes zero-padded to (T, padded_len) uint8
  (act-plus-plus ``compress=True``) with ``/compress_len`` (n_cams, T) giving each frame's byte count. The
  dataset's layout decides which; ``compress_len`` rows follow the recorder's camera list, which the file does
  not store, so each camera's row is found by matching its real JPEG lengths (end of the zero padding) at a
  few spread frames, at every frame only if several rows still agree.
  Without ``compress_len`` the padding is stripped at the last non-zero byte (a JPEG ends with FF D9).

Robot as the models see it: state = selected arm joints then gripper widths as recorded (``gripper_state=
"width"``); action = arm joint targets, normalized to [-1, 1] by the datamodule's cached normalizer, then the
gripper target mapped to [0, 1] by the data's min/max (or ``gripper_range``): 1 = open.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import NoReturn

import h5py
import numpy as np
from PIL import Image

from datamodules.base import DataError, Episode, EpisodeReader, Frames, WindowDataModule
from vitavla.batch import RobotSpec
from vitavla.layouts import ALOHA_ARM_COLUMNS as ARM_COLUMNS
from vitavla.layouts import ALOHA_GRIPPER_CONVENTION as GRIPPER_CONVENTION

QPOS, ACTION, IMAGES, COMPRESS_LEN = "/observations/qpos", "/action", "/observations/images", "/compress_len"
INSTRUCTION_ATTRS = ("instruction", "language_instruction")
INSTRUCTIONS_FILE = "instructions.json"
_EPISODE_RE = re.compile(r"episode_(\d+)\.hdf5$")


@dataclass
class _Camera:
    key: str  # dataset path inside the file
    compressed: bool
    lengths: np.ndarray | None  # (T,) JPEG byte counts from /compress_len, or None (strip trailing zeros)


@dataclass
class _Source:
    path: Path
    state: np.ndarray  # (T, state_dim) float32, selected columns
    action: np.ndarray  # (T, action_dim) float32, raw units
    static: _Camera
    wrist: _Camera


def _fail(path, key: str, problem: str) -> NoReturn:
    raise DataError(path, key, problem)


class AlohaReader(EpisodeReader):
    """Episodes of an ACT/ALOHA HDF5 directory.

    Args:
        root: directory holding ``episode_<i>.hdf5`` (sorted by the number ``i``).
        arms: ``"left"`` or ``"right"`` (one arm: 6 joints + gripper, the paper's PiPer setup; a 7-column
            recording counts as ``"left"``), or ``"both"`` (bimanual: 12 joints + 2 grippers).
        static_camera: the third-person view (``cam_high``/``cam_low`` on ALOHA, ``top`` in ACT sim).
        wrist_camera: the wrist view; default ``cam_<arm>_wrist`` of the chosen arm; must be named for
            ``"both"``. May equal ``static_camera`` for one-camera recordings (ACT sim).
        instruction: dataset-wide instruction, used for episodes that carry none of their own.
            Precedence per episode: ``instructions.json`` beside the episodes (``{"episode_3.hdf5": "..."}``,
            file name or stem) > root attr ``instruction`` > root attr ``language_instruction`` > this
            argument. (The JSON wins so that labels can be fixed without rewriting the recordings.)
            An episode left without any is a :class:`DataError`.
        gripper_range: raw (closed, open) gripper values mapped to targets 0 and 1; default: the data's
            min/max.
        jpeg_bgr: compressed frames were written by ``cv2.imencode`` from the stored arrays (act-plus-plus,
            Cobot Magic), so a standard decoder returns their channels reversed; they are flipped back so a
            compressed recording yields the same arrays as a raw one. False for JPEGs written by an RGB
            encoder.
        jpeg_draft_size: decode JPEG frames directly at the smallest DCT scale (1/2, 1/4, 1/8) that stays at
            least this many pixels on each side — libjpeg's scaled decode, 2-3x faster for 480x640 frames
            that are resized to 224 anyway. None decodes at full size (bit-exact with the stored JPEG).
    """

    def __init__(self, root: str | Path, arms: str = "left", static_camera: str = "cam_high",
                 wrist_camera: str | None = None, instruction: str | None = None,
                 gripper_range: tuple[float, float] | list[float] | None = None, jpeg_bgr: bool = True,
                 jpeg_draft_size: int | None = None):
        self.root = Path(root).expanduser()
        if arms not in ("left", "right", "both"):
            _fail(self.root, "arms", f"must be 'left', 'right' or 'both', got {arms!r}")
        if wrist_camera is None and arms == "both":
            _fail(self.root, "wrist_camera", "arms='both' has two wrist cameras; name the one to use as the "
                                             "wrist view (e.g. cam_left_wrist)")
        self.arms, self.static_camera = arms, static_camera
        self.wrist_camera = wrist_camera or f"cam_{arms}_wrist"
        if gripper_range is not None and len(gripper_range) != 2:
            _fail(self.root, "gripper_range", f"expected [closed, open] raw gripper values, "
                                              f"got {gripper_range!r}")
        self.gripper_range = tuple(float(v) for v in gripper_range) if gripper_range is not None else None
        self.gripper_convention, self.jpeg_bgr = GRIPPER_CONVENTION, jpeg_bgr
        self.jpeg_draft_size = jpeg_draft_size
        n = 1 if arms != "both" else 2
        self.robot = RobotSpec(arm_dim=6 * n, gripper_dim=n, gripper_state="width", gripper_state_dim=n)
        paths = self._episode_paths()
        named = self._instruction_file()
        self._sources: list[_Source] = []
        self.episodes: list[Episode] = []
        for p in paths:
            src, own = self._index(p)
            text = named.get(p.name) or named.get(p.stem) or own or instruction
            if not text:
                _fail(p, "instruction", f"no instruction: set root attr {' or '.join(INSTRUCTION_ATTRS)}, "
                                        f"add {p.name!r} to {self.root / INSTRUCTIONS_FILE}, or pass "
                                        f"instruction=")
            self._sources.append(src)
            self.episodes.append(Episode(key=p.name, length=len(src.state), instruction=text))
        self._handles: dict[int, dict[int, h5py.File]] = {}

    # -- indexing ---------------------------------------------------------------------------------
    def _episode_paths(self) -> list[Path]:
        if not self.root.is_dir():
            _fail(self.root, "root", "not a directory of episode_*.hdf5 files")
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _EPISODE_RE.fullmatch(p.name))]
        if not found:
            others = sorted(p.name for p in self.root.iterdir())[:10]
            _fail(self.root, "episode_*.hdf5", f"no episode files (found {others})")
        return [p for _, p in sorted(found)]  # numeric: episode_10 after episode_9

    def _instruction_file(self) -> dict[str, str]:
        path = self.root / INSTRUCTIONS_FILE
        if not path.is_file():
            return {}
        try:
            named = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            _fail(path, "/", f"not valid JSON: {e}")
        if not isinstance(named, dict) or not all(isinstance(v, str) for v in named.values()):
            _fail(path, "/", 'expected an object mapping episode file name to instruction, e.g. '
                             '{"episode_0.hdf5": "pick up the cup"}')
        return named

    def _index(self, path: Path) -> tuple[_Source, str | None]:
        """Validate one file; keep its low-dim arrays in memory (small: windows then read only images)."""
        try:
            with h5py.File(path, "r") as f:
                return self._index_open(path, f)
        except OSError as e:  # truncated or not HDF5 at all
            _fail(path, "/", f"cannot read as HDF5 (truncated or corrupt file?): {e}")

    def _index_open(self, path: Path, f: h5py.File) -> tuple[_Source, str | None]:
        qpos = _float_array(path, f, QPOS)
        width = qpos.shape[1]
        if width not in ARM_COLUMNS:
            _fail(path, QPOS, f"has shape {qpos.shape}; expected (T, 14) (two arms, left then right: "
                              f"6 joints + gripper each) or (T, 7) (one arm)")
        cols = ARM_COLUMNS[width].get(self.arms)
        if cols is None:
            _fail(path, QPOS, f"has {width} columns (one arm: 6 joints + gripper) but arms={self.arms!r} "
                              f"needs a 14-column two-arm recording; use arms='left' for a single-arm "
                              f"recording")
        action = _float_array(path, f, ACTION)
        t = len(qpos)
        if t == 0:
            _fail(path, QPOS, "empty episode (0 frames)")
        if action.shape != qpos.shape:
            _fail(path, ACTION, f"has shape {action.shape}; expected {qpos.shape} like {QPOS}")
        for key, arr in ((QPOS, qpos), (ACTION, action)):
            bad = ~np.isfinite(arr)
            if bad.any():
                r, c = np.argwhere(bad)[0]
                _fail(path, key, f"contains NaN/inf (first at frame {r}, column {c}); expected finite values")
        cams = self._cameras(path, f, t)
        own = None
        for name in INSTRUCTION_ATTRS:
            v = f.attrs.get(name)
            v = v.decode("utf-8") if isinstance(v, bytes) else v
            if isinstance(v, str) and v.strip():
                own = v
                break
        return _Source(path, qpos[:, cols].astype(np.float32), action[:, cols].astype(np.float32), *cams), own

    def _cameras(self, path: Path, f: h5py.File, t: int) -> tuple[_Camera, _Camera]:
        group = f.get(IMAGES)
        found = sorted(group.keys()) if isinstance(group, h5py.Group) else []
        lengths = None
        out = []
        for name in (self.static_camera, self.wrist_camera):
            key = f"{IMAGES}/{name}"
            ds = group.get(name) if found else None
            if not isinstance(ds, h5py.Dataset):
                _fail(path, key, f"camera missing; cameras found: {found or 'none'} "
                                 f"(set static_camera/wrist_camera)")
            if ds.dtype != np.uint8:
                _fail(path, key, f"dtype {ds.dtype}; expected uint8 images (T, H, W, 3) or JPEG bytes "
                                 f"(T, padded_len)")
            if ds.ndim == 4 and ds.shape[-1] == 3 and ds.shape[0] == t:
                out.append(_Camera(key, False, None))
            elif ds.ndim == 2 and ds.shape[0] == t:
                if lengths is None:
                    lengths = _compress_len(path, f, t, ds.shape[1])
                out.append(_Camera(key, True, _jpeg_row(path, ds, name, lengths)))
            else:
                _fail(path, key, f"shape {ds.shape}; expected ({t}, H, W, 3) raw frames or ({t}, padded_len) "
                                 f"JPEG bytes ({t} frames, like {QPOS})")
        return out[0], out[1]

    # -- reading ----------------------------------------------------------------------------------
    def _file(self, index: int) -> h5py.File:
        # h5py handles must not cross a fork: each worker process opens its own, once, on first use.
        mine = self._handles.setdefault(os.getpid(), {})
        if index not in mine:
            path = self._sources[index].path
            try:
                mine[index] = h5py.File(path, "r")
            except OSError as e:
                _fail(path, "/", f"cannot read as HDF5 (truncated or corrupt file?): {e}")
        return mine[index]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}  # spawn/forkserver workers pickle the reader; open files do not pickle
        return state

    def close(self) -> None:
        for f in self._handles.pop(os.getpid(), {}).values():
            f.close()

    def read(self, index: int, start: int, stop: int) -> Frames:
        src = self._sources[index]
        f = self._file(index)
        views = [self._frames(src.path, f, cam, start, stop) for cam in (src.static, src.wrist)]
        return Frames(static=views[0], wrist=views[1], state=src.state[start:stop],
                      action=src.action[start:stop])

    def _frames(self, path: Path, f: h5py.File, cam: _Camera, start: int, stop: int) -> np.ndarray:
        try:
            data = f[cam.key][start:stop]  # only the frames asked for
        except (OSError, KeyError) as e:
            _fail(path, cam.key, f"cannot read frames {start}:{stop} (corrupt file?): {e}")
        if not cam.compressed:
            return data
        out = []
        for i, buf in enumerate(data):
            t = start + i
            n = int(cam.lengths[t]) if cam.lengths is not None else _unpadded_len(buf)
            try:
                with Image.open(io.BytesIO(buf[:n].tobytes())) as im:
                    if self.jpeg_draft_size:
                        im.draft("RGB", (self.jpeg_draft_size, self.jpeg_draft_size))
                    img = np.asarray(im.convert("RGB"))
            except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for bad/truncated JPEG streams
                _fail(path, f"{cam.key}[{t}]", f"corrupt JPEG ({n} bytes): {e}")
            if out and img.shape != out[0].shape:
                _fail(path, f"{cam.key}[{t}]", f"decodes to {img.shape}, frame {start} to {out[0].shape}")
            out.append(img[..., ::-1] if self.jpeg_bgr else img)
        return np.ascontiguousarray(np.stack(out))

    # -- contract ---------------------------------------------------------------------------------
    def all_actions(self, episodes: Sequence[int] | None = None) -> np.ndarray:
        ids = range(len(self._sources)) if episodes is None else episodes
        return np.concatenate([self._sources[i].action for i in ids])

    def all_states(self, episodes: Sequence[int] | None = None) -> np.ndarray:
        ids = range(len(self._sources)) if episodes is None else episodes
        return np.concatenate([self._sources[i].state for i in ids]).astype(np.float64)  # no frames decoded

    def files(self) -> list[Path]:
        return [s.path for s in self._sources]  # only the episodes determine the action statistics

    @property
    def cache_key(self) -> str:
        """The reader options that change the actions (for the statistics cache fingerprint)."""
        return f"arms={self.arms}|gripper_range={self.gripper_range}"


def _float_array(path: Path, f: h5py.File, key: str) -> np.ndarray:
    ds = f.get(key)
    if not isinstance(ds, h5py.Dataset):
        _fail(path, key, f"missing; expected a (T, 14) or (T, 7) float array (ACT/ALOHA layout); top-level "
                         f"keys: {sorted(f.keys())}")
    if ds.ndim != 2:
        _fail(path, key, f"has shape {ds.shape}; expected (T, 14) or (T, 7)")
    if ds.dtype.kind != "f":
        _fail(path, key, f"dtype {ds.dtype}; expected float (joints in rad, gripper width); convert integer "
                         f"units (e.g. PiPer SDK 0.001 deg) before training")
    return ds[()]


def _compress_len(path: Path, f: h5py.File, t: int, padded: int) -> np.ndarray | None:
    if COMPRESS_LEN not in f:
        return None
    raw = f[COMPRESS_LEN][()]
    if raw.ndim != 2 or raw.shape[1] != t:
        _fail(path, COMPRESS_LEN, f"has shape {raw.shape}; expected (n_cams, {t}) ({t} frames, like {QPOS})")
    lengths = raw.astype(np.int64)
    if not np.isfinite(raw).all() or (lengths != raw).any() or lengths.min() < 1 or lengths.max() > padded:
        _fail(path, COMPRESS_LEN, f"expected whole byte counts in [1, {padded}] (the padded JPEG width)")
    return lengths


def _unpadded_len(buf: np.ndarray) -> int:
    nz = np.flatnonzero(buf)
    return int(nz[-1]) + 1 if len(nz) else 0


def _jpeg_row(path: Path, ds: h5py.Dataset, name: str, lengths: np.ndarray | None) -> np.ndarray | None:
    """This camera's row of compress_len: the one agreeing with the stored JPEGs' real byte counts."""
    if lengths is None:
        return None
    t, rows = ds.shape[0], list(range(len(lengths)))
    # A few spread frames settle it for real cameras; every frame is read only if rows still agree there.
    for frames in (np.unique(np.linspace(0, t - 1, 5).astype(int)), np.arange(t)):
        actual = np.array([_unpadded_len(ds[i]) for i in frames])
        rows = [r for r in rows if np.array_equal(lengths[r, frames], actual)]
        if len(rows) <= 1:
            break
    if not rows:
        shown = frames[:5]
        _fail(path, COMPRESS_LEN, f"no row matches camera {name!r} (its JPEGs at frames {shown.tolist()} are "
                                  f"{actual[:5].tolist()} bytes; rows give {lengths[:, shown].tolist()})")
    return lengths[rows[0]]  # rows left agree with the JPEGs on every frame checked: any of them is right


class AlohaDataModule(WindowDataModule):
    """Windows of an ACT/ALOHA (or single-arm PiPer) HDF5 directory; see :class:`AlohaReader` for the options.

    Episodes are split into train/val by a seeded hold-out of ``val_fraction``; action statistics are fitted
    on the whole directory once and cached under ``stats_cache_dir`` (keyed by files and arm selection).
    ``fast_jpeg`` decodes compressed frames at a reduced DCT scale no smaller than ``image_size`` (see
    ``AlohaReader.jpeg_draft_size``); set it False for bit-exact full-size decoding. ``normalize_state``
    standardises the joint state with training-episode statistics (stored in the checkpoint's normalizer).
    ``cache_frames`` decodes every frame once and holds it in RAM (see :class:`~datamodules.LiberoDataModule`).
    """

    def __init__(self, root: str, arms: str = "left", static_camera: str = "cam_high",
                 wrist_camera: str | None = None, instruction: str | None = None, num_steps: int = 7,
                 image_size: int = 224, batch_size: int = 8, num_workers: int = 4,
                 normalization: str = "minmax", stats_cache_dir: str = "~/.cache/vitavla",
                 pad_tail: bool = True, val_fraction: float = 0.1, seed: int = 0,
                 gripper_range: list[float] | None = None, jpeg_bgr: bool = True, fast_jpeg: bool = True,
                 normalize_state: bool = False, cache_frames: bool = False):
        super().__init__(num_steps=num_steps, image_size=image_size, batch_size=batch_size,
                         num_workers=num_workers, normalization=normalization,
                         stats_cache_dir=stats_cache_dir, pad_tail=pad_tail, val_fraction=val_fraction,
                         seed=seed, normalize_state=normalize_state, cache_frames=cache_frames)
        self.root = root
        self.reader_options = dict(root=root, arms=arms, static_camera=static_camera,
                                   wrist_camera=wrist_camera, instruction=instruction,
                                   gripper_range=gripper_range, jpeg_bgr=jpeg_bgr,
                                   jpeg_draft_size=image_size if fast_jpeg else None)
        self._shared: AlohaReader | None = None

    def make_reader(self, split: str) -> AlohaReader:
        if self._shared is None:  # one directory serves both splits; index it once
            self._shared = AlohaReader(**self.reader_options)
        return self._shared
