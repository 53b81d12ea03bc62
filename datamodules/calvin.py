"""CALVIN (``task_ABC_D``, ``task_D_D``, ``calvin_debug_dataset``) in its original on-disk layout.

``<root>/training`` is the train split and ``<root>/validation`` the val split (the benchmark's definition).
Each holds one ``episode_NNNNNNN.npz`` per frame, ``ep_start_end_ids.npy`` (inclusive [start, end] frame ids
of the recorded episodes) and ``lang_annotations/auto_lang_ann.npy`` (language-annotated segments). An episode
of this reader is one annotated segment with its instruction, as in Seer's finetuning: a window starts at
every frame of a segment such that the window and its action chunks lie inside it (``pad_tail=False``).

Per frame: images ``rgb_static`` (200x200) and ``rgb_gripper`` (84x84); state = ``robot_obs[0:6]`` (TCP xyz +
Euler xyz) + the previous gripper action ``robot_obs[14]`` mapped from -1 closed / +1 open to 0 / 1; action =
``rel_actions`` as stored (arm already scaled to [-1, 1], gripper ±1; the identity normalizer maps the
gripper to [0, 1]). Reading the per-frame files is slow; :func:`pack_calvin` builds a memory-mapped cache
once (see :mod:`datamodules.calvin_pack`). Nothing here writes inside the dataset.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from datamodules.base import DataError, Episode, EpisodeReader, Frames, WindowDataModule
from datamodules.calvin_pack import PACK_VERSION, PackedFrames, read_manifest, write_pack
from vitavla.batch import RobotSpec
from vitavla.layouts import CALVIN_GRIPPER_CONVENTION, CALVIN_ROBOT, calvin_state
from vitavla.normalizer import Normalizer

log = logging.getLogger(__name__)

SPLIT_DIRS = {"train": "training", "val": "validation"}
ROBOT, GRIPPER_CONVENTION = CALVIN_ROBOT, CALVIN_GRIPPER_CONVENTION  # shared with the simulator adapter
FRAME_KEYS = ("rgb_static", "rgb_gripper", "robot_obs", "rel_actions")
NORMALIZATIONS = ("identity", "minmax", "quantile")
_NAME = re.compile(r"^(\D*?)(\d+)\.npz$")


# numpy classes an annotation file may reference: array/scalar reconstruction only. Anything else (os.system,
# eval, arbitrary constructors) would be code execution hidden in a data file.
_ALLOWED_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _AnnotationUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in an annotation file")
        if module.startswith("numpy.core"):  # files written with numpy 1.x; numpy 2 renamed the module
            try:
                return super().find_class("numpy._core" + module[len("numpy.core"):], name)
            except (ImportError, AttributeError):
                pass
        return super().find_class(module, name)


def load_annotations(path: Path) -> list[tuple[int, int, str]]:
    """(start, end, instruction) of every annotated segment of ``auto_lang_ann.npy``, in file order.

    The official file is a pickled dict (numpy object array): ``allow_pickle=False`` cannot read it.
    Instead of ``np.load(allow_pickle=True)``, which would run any code a crafted file contains, the .npy
    header is parsed here and the pickle stream is loaded with an allow-list of numpy array classes; the
    result must be a dict of plain lists/arrays/strings. No other file of the dataset is unpickled.
    """
    if not path.is_file():
        raise DataError(path, "file", "missing; a CALVIN split has lang_annotations/auto_lang_ann.npy")
    try:
        with open(path, "rb") as fp:
            fmt = np.lib.format
            version = fmt.read_magic(fp)
            headers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
            if version not in headers:
                raise ValueError(f"unsupported .npy version {version}")
            shape, _, dtype = headers[version](fp)
            if not dtype.hasobject or shape != ():
                raise ValueError(f"expected a pickled dict (0-d object array), got {dtype} {shape}")
            obj = _AnnotationUnpickler(fp, encoding="ASCII").load()
    except Exception as e:  # a malformed pickle can fail in many ways (KeyError, IndexError, struct.error...)
        raise DataError(path, "file", f"not a CALVIN annotation file ({type(e).__name__}: {e})") from e
    data = obj.item() if isinstance(obj, np.ndarray) and obj.shape == () else obj
    try:
        indx, ann = data["info"]["indx"], data["language"]["ann"]
    except (KeyError, TypeError, IndexError) as e:
        raise DataError(path, "info/indx, language/ann", "expected a dict with ['info']['indx'] and "
                        f"['language']['ann'] ({type(e).__name__}: {e})") from e
    try:
        pairs = np.asarray(indx, dtype=np.int64).reshape(len(indx), 2)
    except (ValueError, TypeError) as e:
        raise DataError(path, "info/indx", f"expected a list of (start, end) frame ids ({e})") from e
    if not isinstance(ann, (list, tuple, np.ndarray)) or not all(isinstance(a, str) for a in ann):
        raise DataError(path, "language/ann", "expected a list of instruction strings")
    if len(ann) != len(pairs):
        raise DataError(path, "language/ann",
                        f"{len(ann)} instructions for {len(pairs)} segments in info/indx")
    return [(int(a), int(b), str(t)) for (a, b), t in zip(pairs, ann)]


def load_episode_ranges(path: Path) -> np.ndarray:
    """(E, 2) inclusive [start, end] frame ids of the recorded episodes."""
    if not path.is_file():
        raise DataError(path, "file", "missing; expected in <root>/training and <root>/validation")
    try:
        ranges = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(path, "file", f"unreadable ({e})") from e
    integer = np.issubdtype(ranges.dtype, np.integer)
    if ranges.ndim != 2 or ranges.shape[1] != 2 or not integer or not len(ranges):
        raise DataError(path, "ep_start_end_ids", f"expected an (E, 2) integer array, got {ranges.dtype} "
                                                  f"{ranges.shape}")
    return ranges.astype(np.int64)


def detect_naming(split_dir: Path) -> tuple[str, int]:
    """(prefix, number of digits) of the frame files, from the first ``<prefix><digits>.npz`` found."""
    with os.scandir(split_dir) as it:  # stops at the first match: a split holds up to ~2M files
        for entry in it:
            m = _NAME.match(entry.name)
            if m and entry.is_file():
                return m.group(1), len(m.group(2))
    raise DataError(split_dir, "episode_NNNNNNN.npz", "no frame files found in the split directory")


def _read_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise DataError(path, missing[0], f"missing; a CALVIN frame needs {list(keys)}, "
                                                  f"this file has {sorted(z.files)}")
            return {k: z[k] for k in keys}
    except FileNotFoundError as e:
        raise DataError(path, "file", "missing frame file referenced by an annotated segment") from e
    except AttributeError as e:  # np.load returned a plain array: an .npy saved under an .npz name
        raise DataError(path, "file", "expected an .npz archive of arrays") from e
    except (zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError) as e:
        raise DataError(path, "file", f"unreadable or truncated .npz ({type(e).__name__}: {e})") from e


def _check_vector(path: Path, key: str, a: np.ndarray, size: int) -> np.ndarray:
    if a.shape != (size,) or not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise DataError(path, key, f"expected a float vector of shape ({size},), got {a.dtype} {a.shape}")
    if not np.isfinite(a).all():
        raise DataError(path, key, f"contains NaN or inf at index {np.flatnonzero(~np.isfinite(a)).tolist()}")
    return a.astype(np.float32)


def _check_image(path: Path, key: str, a: np.ndarray, shape: tuple[int, ...] | None) -> np.ndarray:
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise DataError(path, key, f"expected a uint8 HxWx3 image, got {a.dtype} {a.shape}")
    if shape is not None and a.shape != shape:
        raise DataError(path, key, f"expected {shape} like the split's first frame, got {a.shape}")
    return a


def read_frame(path: Path, static_shape=None, wrist_shape=None):
    """Validated (rgb_static, rgb_gripper, robot_obs float32 (15,), rel_actions float32 (7,)) of one frame."""
    z = _read_npz(path, FRAME_KEYS)
    return (_check_image(path, "rgb_static", z["rgb_static"], static_shape),
            _check_image(path, "rgb_gripper", z["rgb_gripper"], wrist_shape),
            _check_vector(path, "robot_obs", z["robot_obs"], 15),
            _check_vector(path, "rel_actions", z["rel_actions"], 7))


class CalvinSplit:
    """Metadata of one split directory: recorded episodes, annotated segments, frame file naming."""

    def __init__(self, split_dir: str | Path):
        self.dir = Path(split_dir)
        if not self.dir.is_dir():
            hint = "" if self.dir.parent.is_dir() else f" (the dataset root {self.dir.parent} is missing too)"
            raise DataError(self.dir, "split directory",
                            f"missing; a CALVIN dataset root holds training/ and validation/{hint}")
        self.ranges_path = self.dir / "ep_start_end_ids.npy"
        self.ann_path = self.dir / "lang_annotations" / "auto_lang_ann.npy"
        ranges = load_episode_ranges(self.ranges_path)
        self.segments = load_annotations(self.ann_path)
        if not self.segments:
            raise DataError(self.ann_path, "info/indx", "no annotated segments")
        seg = np.asarray([(a, b) for a, b, _ in self.segments], dtype=np.int64)
        # A segment must lie inside one recorded episode, so its frames are contiguous on disk and in a pack.
        ranges = ranges[np.argsort(ranges[:, 0])]
        k = np.searchsorted(ranges[:, 0], seg[:, 0], side="right") - 1  # last episode starting at or before
        inside = (k >= 0) & (seg[:, 1] <= ranges[np.maximum(k, 0), 1]) & (seg[:, 0] <= seg[:, 1])
        bad = np.flatnonzero(~inside)
        if len(bad):
            i = int(bad[0])
            raise DataError(self.ann_path, f"info/indx[{i}]",
                            f"segment {tuple(seg[i].tolist())} is not inside any [start, end] range of "
                            f"{self.ranges_path.name} ({len(bad)} such segments; ranges "
                            f"{ranges.tolist()[:4]}...)")
        self.prefix, self.digits = detect_naming(self.dir)

    def frame_path(self, frame: int) -> Path:
        return self.dir / f"{self.prefix}{frame:0{self.digits}d}.npz"

    def frames(self, segments: list[tuple[int, int, str]] | None = None) -> np.ndarray:
        """Sorted unique frame ids covered by ``segments`` (default: all)."""
        segs = self.segments if segments is None else segments
        return np.unique(np.concatenate([np.arange(a, b + 1, dtype=np.int64) for a, b, _ in segs]))

    def fingerprint(self) -> str:
        """Identity of the source: metadata file contents, naming, and size/mtime of the first and last
        annotated frame files. Cheap (stat'ing ~1M frame files is not); a frame edited in place is missed."""
        h = hashlib.sha256(f"{PACK_VERSION}|{self.prefix}|{self.digits}".encode())
        for p in (self.ranges_path, self.ann_path):
            h.update(p.read_bytes())
        ids = self.frames()
        for f in (ids[0], ids[-1]):
            p = self.frame_path(int(f))
            st = p.stat() if p.is_file() else None
            h.update(f"{p.name}|{st and st.st_size}|{st and int(st.st_mtime)}".encode())
        return h.hexdigest()[:16]


def pack_calvin(split_dir: str | Path, out_dir: str | Path, workers: int = 4) -> Path:
    """Build the packed cache of one split (all frames of its annotated segments) into ``out_dir``.

    Written to a temporary sibling directory and renamed when complete; the source is only read.
    """
    split = CalvinSplit(split_dir)
    out_dir, dataset = Path(out_dir), split.dir.resolve().parent
    if out_dir.resolve().is_relative_to(dataset):  # reading, packing included, never writes into the dataset
        raise ValueError(f"pack directory {out_dir} is inside the dataset {dataset}; choose one outside it")
    ids = split.frames()
    first = read_frame(split.frame_path(int(ids[0])))
    shapes = first[0].shape, first[1].shape
    return write_pack(out_dir, ids, lambda f: read_frame(split.frame_path(f), *shapes), *shapes,
                      source=str(split.dir), fingerprint=split.fingerprint(), workers=workers)


def ensure_pack(split_dir: str | Path, pack_dir: str | Path, workers: int = 4) -> Path:
    """``pack_dir`` holding an up-to-date pack of ``split_dir``: built when missing or stale."""
    try:
        manifest = read_manifest(pack_dir)
    except DataError:  # an unreadable or older-format manifest: a rebuild replaces that pack
        manifest = None
    if manifest is None or manifest.get("fingerprint") != CalvinSplit(split_dir).fingerprint():
        log.info("building CALVIN pack of %s in %s", split_dir, pack_dir)
        pack_calvin(split_dir, pack_dir, workers=workers)
    return Path(pack_dir)


class CalvinReader(EpisodeReader):
    """Annotated segments of one CALVIN split, read from the frame files or from a pack.

    Args:
        split_dir: ``<root>/training`` or ``<root>/validation``.
        num_steps: window length; segments shorter than ``num_steps + action_chunk - 1`` are skipped (logged).
        packed_dir: a pack of this split (see :func:`pack_calvin`); None reads the frame files.
        build_pack: build ``packed_dir`` when missing or stale instead of failing.
        fixed_normalizer: offer the identity normalizer (rel_actions are already in [-1, 1]); False lets the
            datamodule fit min/max statistics instead.
    """

    gripper_range = (-1.0, 1.0)
    gripper_convention = GRIPPER_CONVENTION

    def __init__(self, split_dir: str | Path, num_steps: int = 10, packed_dir: str | Path | None = None,
                 build_pack: bool = False, fixed_normalizer: bool = True):
        self.split = CalvinSplit(split_dir)
        self.root, self.robot, self.fixed_normalizer = self.split.dir, ROBOT, fixed_normalizer
        need = int(num_steps) + ROBOT.action_chunk - 1  # int(): `vitavla data check --option` passes strings
        keep = [(i, s) for i, s in enumerate(self.split.segments) if s[1] - s[0] + 1 >= need]
        if len(keep) < len(self.split.segments):
            log.warning("%s: skipped %d of %d annotated segments shorter than %d frames (num_steps %d + "
                        "action chunk %d - 1)", self.split.ann_path, len(self.split.segments) - len(keep),
                        len(self.split.segments), need, num_steps, ROBOT.action_chunk)
        if not keep:
            raise DataError(self.split.ann_path, "info/indx", f"no annotated segment has the {need} frames a "
                                                              f"window of num_steps={num_steps} needs")
        self.episodes = [Episode(key=f"{self.split.ann_path}[{i}] frames {a}-{b}", length=b - a + 1,
                                 instruction=text, meta={"annotation": i, "start": a, "end": b})
                         for i, (a, b, text) in keep]
        starts = np.asarray([e.meta["start"] for e in self.episodes], dtype=np.int64)
        ends = starts + np.asarray([e.length for e in self.episodes], dtype=np.int64) - 1
        self.pack: PackedFrames | None = None
        if packed_dir is not None:
            if build_pack:
                ensure_pack(self.split.dir, packed_dir)
            self.pack = PackedFrames(packed_dir, self.split.fingerprint())
            self._rows = self.pack.rows(starts, ends)
            self.static_shape, self.wrist_shape = self.pack.static_shape, self.pack.wrist_shape
        else:
            # The two ends of every segment must exist: catches a partial download at once, for 2 stats per
            # segment. A hole inside a segment is reported when that frame is read.
            for e in self.episodes:
                for f in (e.meta["start"], e.meta["end"]):
                    if not self.split.frame_path(f).is_file():
                        raise DataError(self.split.frame_path(f), "file",
                                        f"missing frame file referenced by {e.key}")
            first = read_frame(self.split.frame_path(int(starts[0])))
            self.static_shape, self.wrist_shape = first[0].shape, first[1].shape

    def read(self, index: int, start: int, stop: int) -> Frames:
        ep = self.episodes[index]
        if not 0 <= start < stop <= ep.length:
            raise ValueError(f"frames [{start}, {stop}) out of range for {ep.key} ({ep.length} frames)")
        if self.pack is not None:
            rows = slice(int(self._rows[index]) + start, int(self._rows[index]) + stop)
            # Copies (~1.7 MB per window): read-only memmap views would make torch.from_numpy warn and would
            # keep the mapping alive in whatever holds the frames.
            static, wrist, obs, act = (np.array(self.pack.array(k)[rows])
                                       for k in ("static", "wrist", "robot_obs", "rel_actions"))
        else:
            first = ep.meta["start"] + start
            frames = [read_frame(self.split.frame_path(f), self.static_shape, self.wrist_shape)
                      for f in range(first, first + stop - start)]
            static, wrist, obs, act = (np.stack(x) for x in zip(*frames))
        return Frames(static=static, wrist=wrist, state=calvin_state(obs), action=act.astype(np.float32))

    def all_actions(self, episodes: Sequence[int] | None = None) -> np.ndarray:
        """rel_actions of every annotated frame (every segment, whatever its length: statistics must not
        depend on num_steps, their cache key does not include it). The split is a directory of its own, so
        its statistics always cover all of it."""
        if episodes is not None and sorted(episodes) != list(range(len(self.episodes))):
            raise ValueError("CalvinReader statistics cover a whole split directory, not a subset of segments")
        ids = self.split.frames()
        if self.pack is not None:
            return np.asarray(self.pack.array("rel_actions")[self.pack.rows(ids, ids)], dtype=np.float32)
        rows = []
        for f in tqdm(ids.tolist(), desc=f"reading {self.split.dir} actions", unit="frame", mininterval=1.0):
            path = self.split.frame_path(f)
            action = _read_npz(path, ("rel_actions",))["rel_actions"]
            rows.append(_check_vector(path, "rel_actions", action, 7))
        return np.stack(rows)

    def files(self) -> list[Path]:
        # The default rglob would stat every frame file (millions); the metadata identifies the split.
        return [self.split.ranges_path, self.split.ann_path]

    def default_normalizer(self) -> Normalizer | None:
        if not self.fixed_normalizer:
            return None
        return Normalizer.identity(ROBOT.arm_dim, ROBOT.gripper_dim, gripper_low=-1.0, gripper_high=1.0,
                                   gripper_convention=GRIPPER_CONVENTION)


class CalvinDataModule(WindowDataModule):
    """CALVIN windows for both VITA-VLA stages.

    Args:
        root: dataset root holding ``training/`` and ``validation/`` (e.g. ``.../task_ABC_D``).
        num_steps, image_size, batch_size, num_workers, seed: see :class:`WindowDataModule`.
        normalization: ``identity`` (rel_actions as stored, Seer's choice), ``minmax`` or ``quantile``.
        stats_cache_dir: where fitted min/max or quantile statistics are cached.
        packed_dir: directory of the packed caches (``<packed_dir>/training``, ``<packed_dir>/validation``);
            None reads the per-frame files.
        build_pack: build missing or stale packs (in ``prepare_data``, i.e. once per node).
        pad_tail: False keeps only full windows inside a segment (Seer); True pads windows near its end.
        cache_frames: decode every frame once and hold it in RAM (debug subsets; ABC is far too large).
    """

    normalizations = NORMALIZATIONS

    def __init__(self, root: str, num_steps: int = 10, image_size: int = 224, batch_size: int = 8,
                 num_workers: int = 4, normalization: str = "identity",
                 stats_cache_dir: str = "~/.cache/vitavla", packed_dir: str | None = None,
                 build_pack: bool = False, pad_tail: bool = False, seed: int = 0,
                 cache_frames: bool = False):
        if build_pack and packed_dir is None:
            raise ValueError("build_pack=True needs packed_dir: the directory the packs are written to")
        super().__init__(num_steps=num_steps, image_size=image_size, batch_size=batch_size,
                         num_workers=num_workers, normalization=normalization,
                         stats_cache_dir=stats_cache_dir, pad_tail=pad_tail, val_fraction=0.0, seed=seed,
                         cache_frames=cache_frames)
        self.save_hyperparameters()
        self.root, self.packed_dir, self.build_pack = Path(root).expanduser(), packed_dir, build_pack

    def _pack_dir(self, split: str) -> Path | None:
        return None if self.packed_dir is None else Path(self.packed_dir).expanduser() / SPLIT_DIRS[split]

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node before setup(): packs are built once, not per rank.
        super().prepare_data()
        if self.build_pack:
            for split in SPLIT_DIRS:
                ensure_pack(self.root / SPLIT_DIRS[split], self._pack_dir(split))

    def make_reader(self, split: str) -> CalvinReader:
        return CalvinReader(self.root / SPLIT_DIRS[split], num_steps=self.num_steps,
                            packed_dir=self._pack_dir(split), build_pack=self.build_pack,
                            fixed_normalizer=self.normalization == "identity")

    def split_episodes(self, reader: EpisodeReader, split: str) -> list[int]:
        # training/ and validation/ are separate readers: every segment of a split's reader belongs to it.
        return list(range(len(reader.episodes)))

    @property
    def robot(self) -> RobotSpec:
        return ROBOT  # fixed by the format: no need to index the dataset to wire up the model


__all__ = ["CalvinDataModule", "CalvinReader", "CalvinSplit", "pack_calvin", "ensure_pack"]
