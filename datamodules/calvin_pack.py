"""Packed cache of a CALVIN split: the frames of its annotated segments as a few memory-mapped .npy files.

CALVIN stores one compressed ``episode_NNNNNNN.npz`` per frame, so a 12-frame window costs 12 file opens and
zlib inflates. The pack holds, for the annotated frames only and in frame order:

- ``static.npy`` uint8 (N, H, W, 3) and ``wrist.npy`` uint8 (N, h, w, 3) at native size (resizing stays in the
  worker, as for raw reading, so both paths give identical windows);
- ``robot_obs.npy`` float32 (N, 15) and ``rel_actions.npy`` float32 (N, 7);
- ``frame_ids.npy`` int64 (N,), sorted: row ``r`` holds frame ``frame_ids[r]``;
- ``manifest.json``: format version, shapes, the source path and a fingerprint of the source.

Arrays are opened with ``mmap_mode='r'``: random access reads only the pages a window touches and DataLoader
workers share the page cache. The pack is written into a temporary sibling directory and renamed into place
at the end, so an interrupted build never leaves a directory that looks like a finished pack.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from datamodules.base import DataError

PACK_FORMAT = "vitavla-calvin-pack"
PACK_VERSION = 1
MANIFEST = "manifest.json"
ARRAYS = ("static", "wrist", "robot_obs", "rel_actions")
BLOCK = 256
"""Frames read concurrently before they are written; bounds the memory of a build."""

FrameTuple = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def write_pack(out_dir: str | Path, frame_ids: np.ndarray, read_frame: Callable[[int], FrameTuple],
               static_shape: tuple[int, ...], wrist_shape: tuple[int, ...], source: str, fingerprint: str,
               workers: int = 4) -> Path:
    """Write a pack of ``frame_ids`` (sorted, unique) to ``out_dir`` atomically; returns ``out_dir``.

    ``read_frame(frame_id)`` returns validated (static, wrist, robot_obs, rel_actions). Any error (bad frame,
    full disk, Ctrl-C) removes the temporary directory and leaves an existing ``out_dir`` untouched.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / MANIFEST).is_file() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} exists and is not a CALVIN pack (no {MANIFEST}); refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    frame_ids = np.asarray(frame_ids, dtype=np.int64)
    n = len(frame_ids)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        specs = {"static": (np.uint8, (n, *static_shape)), "wrist": (np.uint8, (n, *wrist_shape)),
                 "robot_obs": (np.float32, (n, 15)), "rel_actions": (np.float32, (n, 7))}
        arrays = {k: np.lib.format.open_memmap(tmp / f"{k}.npy", mode="w+", dtype=d, shape=s)
                  for k, (d, s) in specs.items()}
        # Threads, not processes: inflating the npz members (zlib) releases the GIL, and the frames are
        # written straight into the memory maps without pickling 140 kB per frame between processes.
        with ThreadPoolExecutor(max(1, workers)) as pool, \
                tqdm(total=n, desc=f"packing {source}", unit="frame", mininterval=1.0) as bar:
            for lo in range(0, n, BLOCK):
                ids = frame_ids[lo:lo + BLOCK].tolist()
                for row, frame in enumerate(pool.map(read_frame, ids), start=lo):
                    for name, value in zip(ARRAYS, frame):
                        arrays[name][row] = value
                bar.update(len(ids))
        for a in arrays.values():
            a.flush()
        del arrays
        np.save(tmp / "frame_ids.npy", frame_ids)
        manifest = {"format": PACK_FORMAT, "version": PACK_VERSION, "source": source,
                    "fingerprint": fingerprint, "num_frames": n, "static_shape": list(static_shape),
                    "wrist_shape": list(wrist_shape)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))  # written last: marks a finished pack
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; a previous (stale) pack is moved aside first and deleted after."""
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except BaseException:
        old.rename(out_dir)  # put the previous pack back rather than leave nothing
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(pack_dir: str | Path) -> dict | None:
    """The manifest of a finished pack, or None when ``pack_dir`` holds none."""
    path = Path(pack_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(path, "manifest", f"not valid JSON ({e}); delete the pack and rebuild it") from e
    if not isinstance(manifest, dict) or manifest.get("format") != PACK_FORMAT:
        raise DataError(path, "format", f"expected {PACK_FORMAT!r}; this is not a vitavla CALVIN pack")
    if manifest.get("version") != PACK_VERSION:
        raise DataError(path, "version", f"pack version {manifest.get('version')} but this code reads "
                                         f"version {PACK_VERSION}; rebuild it (build_pack=True)")
    return manifest


class PackedFrames:
    """Read-only access to a pack. Memory maps are opened lazily per process and never pickled (a pickled
    np.memmap would copy the whole array into every DataLoader worker)."""

    def __init__(self, pack_dir: str | Path, fingerprint: str):
        self.dir = Path(pack_dir)
        manifest = read_manifest(self.dir)
        if manifest is None:
            raise DataError(self.dir, MANIFEST, "missing: no finished CALVIN pack here; build it with "
                                                "build_pack=True or datamodules.calvin.pack_calvin()")
        if manifest.get("fingerprint") != fingerprint:
            raise DataError(self.dir / MANIFEST, "fingerprint",
                            f"pack was built from a different version of {manifest.get('source')} "
                            f"(pack {manifest.get('fingerprint')}, source now {fingerprint}); rebuild it "
                            "(build_pack=True)")
        self.manifest = manifest
        self._arrays: dict[str, np.ndarray] | None = None
        n = int(manifest["num_frames"])
        expected = {"static": (n, *manifest["static_shape"]), "wrist": (n, *manifest["wrist_shape"]),
                    "robot_obs": (n, 15), "rel_actions": (n, 7), "frame_ids": (n,)}
        for name, shape in expected.items():
            got = self.array(name).shape
            if tuple(got) != tuple(shape):
                raise DataError(self.dir / f"{name}.npy", "shape", f"expected {tuple(shape)} per {MANIFEST}, "
                                                                   f"got {tuple(got)}; rebuild the pack")
        self.frame_ids = np.array(self.array("frame_ids"))  # small; an in-memory copy pickles cheaply

    @property
    def static_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["static_shape"])

    @property
    def wrist_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["wrist_shape"])

    def array(self, name: str) -> np.ndarray:
        if self._arrays is None:
            self._arrays = {}
        if name not in self._arrays:
            path = self.dir / f"{name}.npy"
            try:
                self._arrays[name] = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DataError(path, name, f"unreadable pack array ({e}); rebuild the pack") from e
        return self._arrays[name]

    def rows(self, first: np.ndarray, last: np.ndarray) -> np.ndarray:
        """Row of frame ``first[i]``, checking that frames ``first[i]..last[i]`` are contiguous rows."""
        first, last = np.asarray(first, dtype=np.int64), np.asarray(last, dtype=np.int64)
        ids, n = self.frame_ids, len(self.frame_ids)
        r0, r1 = np.searchsorted(ids, first), np.searchsorted(ids, last)
        ok = (r0 < n) & (r1 < n)
        ok &= (ids[np.minimum(r0, n - 1)] == first) & (ids[np.minimum(r1, n - 1)] == last)
        ok &= (r1 - r0) == (last - first)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise DataError(self.dir / "frame_ids.npy", "frame_ids",
                            f"frames {first[i]}..{last[i]} of an annotated segment are not in the pack; "
                            "rebuild it (build_pack=True)")
        return r0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}
