"""Training loaders that resume exactly where a killed run stopped, mid-epoch or at an epoch end.

Two pieces, used by every training datamodule (:class:`~datamodules.base.WindowDataModule`, hence every real
format, and :class:`~datamodules.synthetic.SyntheticWindowDataModule`):

* :class:`EpochSampler`: the order of epoch ``e`` is a function of ``(seed, e)`` alone (``torch.randperm``
  seeded with ``seed + e``, then this process's shard), never of a generator's history. A
  ``DataLoader(shuffle=True, generator=...)`` draws each epoch from the generator's running state, so a
  resumed run, whose loader is new, replayed epoch 0's order in epoch 1. Lightning calls ``set_epoch`` at
  every epoch start, the resumed one included. Being a ``DistributedSampler``, it is kept as is under DDP.
* :class:`ResumableLoader`: a ``DataLoader`` with ``state_dict`` / ``load_state_dict``, which Lightning
  saves in the checkpoint (``loops.fit_loop.state_dict.combined_loader``) and restores before the resumed
  epoch. The state is the epoch, the batches already handed to the training loop, and the random number
  generators' states at that moment; the resumed epoch skips those batches (their indices, not their data:
  nothing is read) and restores the generators just before its first batch, so dropout and augmentations
  draw what the uninterrupted run drew. The count is of batches *yielded*, not of indices the sampler
  produced: worker processes prefetch ahead of the training loop.
"""

from __future__ import annotations

import random
import weakref
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class EpochSampler(DistributedSampler):
    """Indices of one process for one epoch, a function of ``(seed, epoch)``; ``skip`` drops the first
    indices of the next iteration only (set by :class:`ResumableLoader` when it resumes mid-epoch)."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0):
        # drop_last=False: shards are padded to equal length, as Lightning's own DistributedSampler does.
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=False)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        indices = list(super().__iter__())
        return iter(indices[skip:])


def _rng_states() -> dict[str, Any]:
    """The global generators' states as tensors and plain Python values: checkpoints are read with
    ``torch.load(weights_only=True)``, which refuses numpy arrays."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                        float(cached)]}
    if torch.cuda.is_available():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in states["python"]))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "torch.cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over an :class:`EpochSampler` whose position Lightning saves and restores.

    Its ``generator`` (workers' base seed) is re-seeded from ``(seed, epoch)`` at every epoch, so that
    worker-side randomness, too, does not depend on how many epochs this loader object has seen.
    """

    def __init__(self, dataset: Dataset, *args: Any, **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        if not isinstance(self.sampler, EpochSampler):
            raise TypeError(f"ResumableLoader needs an EpochSampler, got {type(self.sampler).__name__}")
        self._epoch = 0
        self._yielded = 0
        self._resume: dict | None = None
        self._trainer = None  # weakref to the Trainer whose checkpoint may hold this loader's state

    def attach(self, trainer) -> ResumableLoader:
        """Let this loader fetch its state from ``trainer``'s restored checkpoint (_pull_pending_state)."""
        self._trainer = weakref.ref(trainer) if trainer is not None else None
        return self

    def __iter__(self) -> Iterator:
        # A generator: nothing below runs until the first batch is asked for, i.e. after Lightning has
        # called set_epoch (it creates the epoch's iterator first, then sets the epoch).
        return self._iterate()

    def _iterate(self) -> Iterator:
        self._pull_pending_state()
        epoch = int(self.sampler.epoch)
        resume, self._resume = self._resume, None
        skip = int(resume["batches"]) if resume is not None and int(resume["epoch"]) == epoch else 0
        skip = min(skip, len(self))
        self.sampler.skip = skip * int(self.batch_size or 1)
        if self.generator is not None:
            self.generator.manual_seed(hash((int(self.sampler.seed), epoch)) & (2**63 - 1))
        self._epoch, self._yielded = epoch, skip
        rng = resume.get("rng") if resume is not None else None
        for batch in super().__iter__():
            if rng is not None:  # now, not at load time: restoring the checkpoint itself draws numbers
                _restore_rng_states(rng)
                rng = None
            self._yielded += 1
            yield batch

    def _pull_pending_state(self) -> None:
        """Load the checkpoint's loader state if Lightning holds it but has not handed it over.

        Lightning 2.6 loads it in ``FitLoop.setup_data``, which returns early when the loader already exists;
        and a module whose ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (ours do, for
        the warmup and cosine schedule) makes it exist before the checkpoint is restored. Without this, a
        resumed epoch silently restarted at its first batch. Called at the first batch, when the restore is
        done and ``fit_loop.restarting`` is still set."""
        trainer = self._trainer() if self._trainer is not None else None
        loop = getattr(trainer, "fit_loop", None)
        combined = getattr(loop, "_combined_loader", None)
        pending = getattr(loop, "_combined_loader_states_to_load", None)
        mine = combined is not None and any(dl is self for dl in combined.flattened)
        if self._resume is None and pending and mine:
            loop._load_combined_loader_states()  # calls load_state_dict of this loader (and any other)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "batches": self._yielded, "rng": _rng_states()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in ("epoch", "batches") if k not in state]
        if missing:
            raise ValueError(f"the checkpoint's training-loader state lacks {missing}; found {sorted(state)}")
        self._resume = dict(state)


def resumable_loader(dataset: Dataset, trainer, seed: int, **kwargs: Any) -> ResumableLoader:
    """A shuffled training loader of ``dataset`` for this process (``trainer``'s rank and world size; one
    process without a trainer)."""
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    return ResumableLoader(dataset, sampler=sampler, generator=torch.Generator(), **kwargs).attach(trainer)
