"""One episode of closed-loop evaluation: what to run (:class:`EpisodeSpec`), what came out
(:class:`EpisodeResult`), what the policy sees of a simulator frame (:func:`to_observation`), and how a
simulator failure is told apart from a policy bug (:class:`EnvError`, :func:`sim_call`).

Both the sequential runner (:mod:`vitavla.rollout.runner`) and the batched one (:mod:`vitavla.rollout.parallel`)
build on these, so they live below both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vitavla.errors import UserFacingError
from vitavla.images import resize_uint8
from vitavla.normalizer import Normalizer
from vitavla.observation import Observation
from vitavla.rollout.env import Obs


def to_observation(obs: Obs, image_size: int, instruction: str | None = None,
                   normalizer: Normalizer | None = None) -> Observation:
    """One env observation -> a batch-of-one :class:`Observation` (views: static, wrist), resized by the same
    :func:`~vitavla.images.resize_uint8` as the training windows; the state is standardised by ``normalizer``
    exactly as the datamodule did in training (a no-op for a normalizer without state statistics)."""
    images = torch.stack([resize_uint8(obs.static, image_size), resize_uint8(obs.wrist, image_size)])
    state = torch.from_numpy(np.asarray(obs.state, dtype=np.float32))[None]
    if normalizer is not None:
        state = normalizer.normalize_state(state)
    return Observation(images[None], state, [obs.instruction if instruction is None else instruction])


@dataclass(frozen=True)
class EpisodeSpec:
    """One episode to run: a task, which of its initial states, and the seed of torch and numpy."""

    task_index: int
    episode_index: int
    seed: int = 0

    @property
    def key(self) -> tuple[int, int, int]:
        return self.task_index, self.episode_index, self.seed


@dataclass
class EpisodeResult:
    """One episode attempt. ``frames`` (recorded episodes only): :attr:`Obs.frame` of every observation, the
    one after reset through the one after the last step (``steps + 1`` frames). ``first_last`` (every
    episode that reset): those two frames alone, cheap enough to keep for a contact sheet of all episodes.
    Neither goes into results files (:func:`~vitavla.rollout.runner.result_record`)."""

    task: int
    episode: int
    success: bool
    steps: int
    error: str | None = None
    frames: list | None = None
    seconds_sim: float = 0.0
    seconds_policy: float = 0.0
    instruction: str | None = None
    first_last: list | None = None


class EnvError(Exception):
    """Wraps an exception raised inside the simulator, so policy bugs are not mistaken for sim crashes."""


def sim_call(fn, *args):
    """``fn(*args)``, a call into the simulator: its failures come out as :class:`EnvError`."""
    try:
        return fn(*args)
    except (ImportError, UserFacingError):
        # A missing package or a setting that can never work fails every attempt the same way: it stops the
        # run with its own message instead of being recorded (and retried) as a simulator crash.
        raise
    except Exception as e:  # any simulator failure: physics blow-up, renderer error, adapter bug
        raise EnvError(f"{type(e).__name__}: {e}") from e
