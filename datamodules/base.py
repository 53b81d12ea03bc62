"""What every on-disk format shares: the reader contract, windowing, resizing and the datamodule.

A format implements :class:`EpisodeReader` (list its episodes, read a frame range of one episode). Everything
after that is common: :class:`WindowDataset` cuts windows of ``num_steps`` steps, labels step ``t`` chunk
``j`` with the action at ``t + j``, pads past the episode end with masks, resizes both views to the model's
size in the worker (uint8 all the way) and normalizes actions; :class:`WindowDataModule` splits episodes,
fits (or loads cached) normalization statistics and builds the loaders.
"""

from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.normalization import Normalizer, cached_normalizer, dataset_fingerprint
from datamodules.resumable import resumable_loader
from vitavla.batch import RobotSpec, collate_windows
from vitavla.errors import UserFacingError
from vitavla.images import resize_uint8  # the one resize, shared with rollouts (vitavla.rollout.episode)

log = logging.getLogger(__name__)


class DataError(UserFacingError, ValueError):
    """Bad data on disk: the message names the file, the key and what was expected."""

    def __init__(self, file: str | Path, key: str, problem: str):
        super().__init__(f"{file}: {key}: {problem}")
        self.file, self.key, self.problem = str(file), key, problem


@dataclass
class Episode:
    """One demonstration (or one annotated segment) as the reader indexes it."""

    key: str
    """Where it lives, for messages (file name, or file + group)."""
    length: int
    instruction: str
    meta: dict | None = None


@dataclass
class Frames:
    """Frames ``[start, stop)`` of one episode in raw units; images uint8 (n, H, W, 3) at their native size."""

    static: np.ndarray
    wrist: np.ndarray
    state: np.ndarray  # (n, state_dim) float32, gripper already in the RobotSpec convention
    action: np.ndarray  # (n, arm_dim + gripper_dim) float32, raw units


class EpisodeReader(ABC):
    """A dataset on disk in one format. Subclasses fill ``episodes`` and ``robot`` in their constructor."""

    episodes: list[Episode]
    robot: RobotSpec
    root: Path

    @abstractmethod
    def read(self, index: int, start: int, stop: int) -> Frames:
        """Frames ``[start, stop)`` of episode ``index``; raise :class:`DataError` on bad content."""

    @abstractmethod
    def all_actions(self, episodes: Sequence[int] | None = None) -> np.ndarray:
        """Every raw action of ``episodes`` (default: all), (N, action_dim), for normalization statistics."""

    def all_states(self, episodes: Sequence[int] | None = None) -> np.ndarray:
        """Every raw state of ``episodes`` (default: all), (N, state_dim), for state statistics.

        Reads whole episodes through :meth:`read` (frames included); formats with a cheaper path override it.
        """
        ids = range(len(self.episodes)) if episodes is None else episodes
        return np.concatenate([self.read(i, 0, self.episodes[i].length).state for i in ids]).astype(np.float64)

    def files(self) -> list[Path]:
        """Files whose identity fingerprints the dataset (for the statistics cache)."""
        return sorted(p for p in self.root.rglob("*") if p.is_file())

    @property
    def cache_key(self) -> str:
        """Reader options that change the action statistics, folded into the statistics cache fingerprint."""
        return ""

    def default_normalizer(self) -> Normalizer | None:
        """A fixed normalizer when the format's actions are already normalized (e.g. CALVIN rel_actions)."""
        return None


class MemoryReader(EpisodeReader):
    """Every frame of some episodes of another reader, decoded once and held in RAM.

    For datasets that fit in memory (the quickstart's 20 demos at 56 px are 60 MB): a training step then
    costs no file read or decode, which on a 2-core machine was half of each teacher step. The frames are
    loaded in the process that builds the datamodule, before the DataLoader forks, so workers share the pages
    instead of each holding a copy. Episodes outside ``episode_ids`` fall through to the wrapped reader.
    """

    def __init__(self, inner: EpisodeReader, episode_ids: Sequence[int]):
        self.inner, self.episodes, self.robot, self.root = inner, inner.episodes, inner.robot, inner.root
        ids = sorted(set(episode_ids))
        frames = [inner.read(e, 0, inner.episodes[e].length) for e in ids]
        starts = np.cumsum([0] + [len(f.action) for f in frames])
        self.offset: dict[int, int] = {e: int(o) for e, o in zip(ids, starts[:-1])}
        """Row of each held episode's first frame in the arrays below (episodes back to back, sorted)."""

        def cat(key: str) -> np.ndarray | None:
            parts = [getattr(f, key) for f in frames]
            if not parts or len({p.shape[1:] for p in parts}) > 1:
                return None
            return np.concatenate(parts)
        # Every field over all held episodes in one array, so a batch of windows is gathered with one fancy
        # index per field (WindowDataset.__getitems__). Views; images only when all episodes share a size.
        self.state, self.action, self.static, self.wrist = (cat(k) for k in ("state", "action", "static", "wrist"))
        self._frames = {}
        for e, f, lo, hi in zip(ids, frames, starts[:-1], starts[1:]):
            whole = {k: getattr(self, k)[lo:hi] if getattr(self, k) is not None else getattr(f, k)
                     for k in ("static", "wrist", "state", "action")}
            self._frames[e] = Frames(**whole)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for f in self._frames.values() for a in (f.static, f.wrist, f.state, f.action))

    def read(self, index: int, start: int, stop: int) -> Frames:
        f = self._frames.get(index)
        if f is None:
            return self.inner.read(index, start, stop)
        length = self.episodes[index].length
        if not 0 <= start < stop <= length:
            raise DataError(self.episodes[index].key, "frames",
                            f"a frame range inside [0, {length}), got [{start}, {stop})")
        return Frames(static=f.static[start:stop], wrist=f.wrist[start:stop], state=f.state[start:stop],
                      action=f.action[start:stop])

    def all_actions(self, episodes: Sequence[int] | None = None) -> np.ndarray:
        return self.inner.all_actions(episodes)

    def all_states(self, episodes: Sequence[int] | None = None) -> np.ndarray:
        return self.inner.all_states(episodes)

    def files(self) -> list[Path]:
        return self.inner.files()

    @property
    def cache_key(self) -> str:
        return self.inner.cache_key

    def default_normalizer(self) -> Normalizer | None:
        return self.inner.default_normalizer()


class WindowDataset(Dataset):
    """Windows of ``num_steps`` steps over the episodes of a reader.

    ``pad_tail=False`` keeps only windows whose every step and chunk label lies inside the episode (Seer's
    CALVIN sampling); ``pad_tail=True`` starts a window at every frame and pads the tail with masks.
    """

    def __init__(self, reader: EpisodeReader, episode_ids: list[int], num_steps: int, image_size: int,
                 normalizer: Normalizer, pad_tail: bool = True, stride: int = 1):
        self.reader, self.num_steps, self.image_size = reader, num_steps, image_size
        self.normalizer, self.robot = normalizer, reader.robot
        chunk = self.robot.action_chunk
        need = num_steps + chunk - 1
        self.index: list[tuple[int, int]] = []
        for e in episode_ids:
            length = reader.episodes[e].length
            last_start = length - 1 if pad_tail else length - need
            self.index.extend((e, s) for s in range(0, last_start + 1, stride))
        # Episodes held in RAM get their actions and states normalised once, all together: normalising is
        # per row, so indexing the result equals normalising the rows, bit for bit, and a window then costs
        # only indexing. Per window, the normaliser's small tensor ops were 80% of a cached batch's cost.
        self._memory = (isinstance(reader, MemoryReader) and bool(episode_ids) and reader.action is not None
                        and all(e in reader.offset for e in episode_ids))
        self._batched = self._memory and reader.static is not None and reader.wrist is not None
        if self._memory:
            self._actions = normalizer.normalize_actions(torch.from_numpy(reader.action.astype(np.float32))).numpy()
            self._states = normalizer.normalize_state(torch.from_numpy(reader.state.astype(np.float32))).numpy()
            index = np.asarray(self.index, dtype=np.int64).reshape(-1, 2)
            lengths = np.array([reader.episodes[e].length for e in range(len(reader.episodes))], dtype=np.int64)
            offsets = np.array([reader.offset.get(e, -1) for e in range(len(reader.episodes))], dtype=np.int64)
            # Per window: its first frame's row in the reader's arrays, and how many frames it has (<= need).
            self._start = index[:, 1]
            self._row0 = offsets[index[:, 0]] + self._start
            self._frames = np.minimum(lengths[index[:, 0]] - index[:, 1], need)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        e, start = self.index[i]
        ep = self.reader.episodes[e]
        t, c = self.num_steps, self.robot.action_chunk
        stop = min(ep.length, start + t + c - 1)
        fr = self.reader.read(e, start, stop)
        n = stop - start
        steps = np.arange(t)
        frame = np.minimum(steps, n - 1)  # padding steps repeat the last frame
        labels = steps[:, None] + np.arange(c)[None]  # step t, chunk j -> frame t + j
        action_valid = labels < n
        if not self._memory:
            actions = torch.from_numpy(fr.action[np.minimum(labels, n - 1)].astype(np.float32))
            actions = self.normalizer.normalize_actions(actions)
            state = self.normalizer.normalize_state(torch.from_numpy(fr.state[frame].astype(np.float32)))
        else:
            # numpy fancy indexing copies (safe to edit below) at a fraction of a torch op's overhead
            row0 = self._row0[i]
            actions = torch.from_numpy(self._actions[row0 + np.minimum(labels, n - 1)])
            state = torch.from_numpy(self._states[row0 + frame])
        actions[..., : self.robot.arm_dim][torch.from_numpy(~action_valid)] = 0.0  # padded arm = no motion
        images = torch.empty(t, 2, 3, self.image_size, self.image_size, dtype=torch.uint8)
        images[:, 0] = resize_uint8(fr.static[frame], self.image_size)
        images[:, 1] = resize_uint8(fr.wrist[frame], self.image_size)
        return {
            "images": images,
            "instruction": ep.instruction,
            "state": state,
            "valid": torch.from_numpy(steps < n),
            "actions": actions,
            "action_valid": torch.from_numpy(action_valid),
            "episode_id": torch.tensor(e),
            "frame_index": torch.from_numpy(start + frame),
        }

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """Windows ``indices`` (the DataLoader's batch fetch): for in-memory episodes gathered for the whole
        batch at once, one fancy index per field, and equal to ``[self[i] for i in indices]``."""
        if not self._batched:
            return [self[i] for i in indices]
        idx = np.asarray(indices, dtype=np.int64)
        t, c, arm = self.num_steps, self.robot.action_chunk, self.robot.arm_dim
        n = self._frames[idx][:, None]  # (B, 1) frames each window has
        steps = np.arange(t)[None]
        frame = np.minimum(steps, n - 1)  # (B, T): padding steps repeat the last frame
        labels = steps[..., None] + np.arange(c)  # (1, T, C): step t, chunk j -> frame t + j
        row0 = self._row0[idx][:, None]
        rows = row0 + frame
        action_valid = labels < n[..., None]
        actions = torch.from_numpy(self._actions[row0[..., None] + np.minimum(labels, n[..., None] - 1)])
        actions[..., :arm][torch.from_numpy(~action_valid)] = 0.0  # padded arm = no motion
        b, s = len(idx), self.image_size
        images = torch.empty(b, t, 2, 3, s, s, dtype=torch.uint8)
        for v, view in enumerate((self.reader.static, self.reader.wrist)):
            images[:, :, v] = resize_uint8(view[rows.reshape(-1)], s).unflatten(0, (b, t))
        state = torch.from_numpy(self._states[rows])
        valid = torch.from_numpy(steps < n)
        action_valid = torch.from_numpy(action_valid)
        frame_index = torch.from_numpy(self._start[idx][:, None] + frame)
        episodes = [self.index[i][0] for i in indices]
        return [{"images": images[k], "instruction": self.reader.episodes[e].instruction, "state": state[k],
                 "valid": valid[k], "actions": actions[k], "action_valid": action_valid[k],
                 "episode_id": torch.tensor(e), "frame_index": frame_index[k]} for k, e in enumerate(episodes)]


class WindowDataModule(L.LightningDataModule):
    """Shared datamodule logic; format subclasses implement :meth:`make_reader` (and its split)."""

    normalizations: tuple[str, ...] = ("minmax", "quantile")
    """Action normalisations the format supports; ``identity`` only where the reader has fixed statistics."""

    def __init__(self, num_steps: int = 10, image_size: int = 224, batch_size: int = 8, num_workers: int = 4,
                 normalization: str = "minmax", stats_cache_dir: str = "~/.cache/vitavla", pad_tail: bool = True,
                 val_fraction: float = 0.05, seed: int = 0, normalize_state: bool = False,
                 cache_frames: bool = False):
        super().__init__()
        # Checked here for every format: the statistics code would quietly treat any other value as minmax.
        if normalization not in self.normalizations:
            raise ValueError(f"{type(self).__name__}.normalization must be one of {self.normalizations}, "
                             f"got {normalization!r}")
        self.num_steps, self.image_size, self.batch_size = num_steps, image_size, batch_size
        self.num_workers, self.normalization, self.stats_cache_dir = num_workers, normalization, stats_cache_dir
        self.pad_tail, self.val_fraction, self.seed = pad_tail, val_fraction, seed
        self.normalize_state, self.cache_frames = bool(normalize_state), bool(cache_frames)
        self.normalizer: Normalizer | None = None
        self._readers: dict[str, EpisodeReader] = {}
        self._train: WindowDataset | None = None
        self._val: WindowDataset | None = None

    # -- hooks for formats ------------------------------------------------------------------------
    def make_reader(self, split: str) -> EpisodeReader:
        """The reader of ``split`` ("train" or "val"); the same object may serve both."""
        raise TypeError(f"{type(self).__name__} must implement make_reader(split)")

    def split_episodes(self, reader: EpisodeReader, split: str) -> list[int]:
        """Episode indices of a split; by default a seeded hold-out of ``val_fraction`` of the episodes."""
        n = len(reader.episodes)
        order = np.random.default_rng(self.seed).permutation(n)
        n_val = int(round(n * self.val_fraction)) if n > 1 else 0
        n_val = min(max(n_val, 1 if self.val_fraction > 0 and n > 1 else 0), n - 1)
        chosen = order[:n_val] if split == "val" else order[n_val:]
        return sorted(int(i) for i in chosen)

    # -- common ----------------------------------------------------------------------------------
    def reader(self, split: str) -> EpisodeReader:
        """``make_reader(split)``, built once (indexing a dataset can take a while)."""
        if split not in self._readers:
            self._readers[split] = self.make_reader(split)
        return self._readers[split]

    @property
    def robot(self) -> RobotSpec:
        return self.reader("train").robot

    def fit_normalizer(self, reader: EpisodeReader) -> Normalizer:
        fixed = reader.default_normalizer()
        if fixed is not None and self.normalization == "identity":
            return fixed
        # Statistics come from the training episodes only: a held-out error must not see the hold-out's range.
        train = self.split_episodes(reader, "train")
        episodes = None if len(train) == len(reader.episodes) else train
        split = "all" if episodes is None else hashlib.sha1(",".join(map(str, train)).encode()).hexdigest()[:12]
        state = "|state=standardize" if self.normalize_state else ""  # unchanged keys for existing caches
        fp = dataset_fingerprint(reader.files(), extra=f"{type(reader).__name__}|{self.normalization}|"
                                                       f"{reader.cache_key}|train={split}{state}")
        mode, robot = self.normalization, reader.robot

        def fit() -> Normalizer:
            norm = Normalizer.fit(reader.all_actions(episodes), robot.arm_dim, mode=mode,
                                  gripper_range=getattr(reader, "gripper_range", None),
                                  gripper_convention=getattr(reader, "gripper_convention", ""))
            if not self.normalize_state:
                return norm
            # Binary gripper flags stay 0/1: the models turn them into one-hots by thresholding at 0.5.
            raw = range(robot.arm_dim, robot.state_dim) if robot.gripper_state == "binary" else ()
            return norm.with_state_stats(reader.all_states(episodes), raw_dims=raw)
        return cached_normalizer(self.stats_cache_dir, fp, fit)

    def check_root(self) -> None:
        """Fail first, naming the key and the path, when the configured dataset ``root`` does not exist
        (the format's reader would fail later, deeper, and name a file inside it)."""
        root = getattr(self, "root", None)
        for path in [root] if isinstance(root, (str, Path)) else list(root or []):
            if not Path(path).expanduser().exists():
                raise DataError(path, "data.init_args.root", "does not exist")

    def prepare_data(self) -> None:
        self.check_root()

    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        self.check_root()
        train_reader = self.reader("train")
        if self.normalizer is None:  # a normalizer restored from a checkpoint wins over a re-fit
            self.normalizer = self.fit_normalizer(train_reader)
        val_reader = self.reader("val")
        train_ids, val_ids = self.split_episodes(train_reader, "train"), self.split_episodes(val_reader, "val")
        if self.cache_frames:
            train_reader, val_reader = MemoryReader(train_reader, train_ids), MemoryReader(val_reader, val_ids)
            log.info("cache_frames: %d training + %d validation episodes in memory (%.0f MB)", len(train_ids),
                     len(val_ids), (train_reader.nbytes + val_reader.nbytes) / 2**20)
        common = dict(num_steps=self.num_steps, image_size=self.image_size, normalizer=self.normalizer)
        self._train = WindowDataset(train_reader, train_ids, pad_tail=self.pad_tail, **common)
        self._val = WindowDataset(val_reader, val_ids, pad_tail=self.pad_tail, **common)

    def _loader(self, ds: WindowDataset, shuffle: bool) -> DataLoader:
        common = dict(batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate_windows,
                      persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())
        if shuffle:
            # Training: the order is a function of (seed, epoch) and the position goes into the checkpoint,
            # so a killed run resumes on the very next batch (datamodules/resumable.py).
            return resumable_loader(ds, self.trainer, self.seed, drop_last=len(ds) > self.batch_size,
                                    **common)
        return DataLoader(ds, shuffle=False, **common)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self._train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self._val, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def state_dict(self) -> dict:
        return {"normalizer": self.normalizer.state_dict()} if self.normalizer is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if "normalizer" in state:
            self.normalizer = Normalizer.from_state_dict(state["normalizer"])
