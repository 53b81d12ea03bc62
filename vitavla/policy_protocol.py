"""The one interface closed-loop code drives a policy through, the one adapter to it, and the one check.

Every closed loop in vitavla (the sequential runner, the batched waves of :mod:`vitavla.rollout.parallel`,
CALVIN chains, ``vitavla test``'s :class:`~vitavla.rollout.lightning.RolloutTestCallback`) steps a
:class:`RolloutPolicy`. What a LightningModule or a caller hands over is one of: a
:class:`~vitavla.policy.VLAPolicy` (a full-window model: :func:`as_rollout_policy` streams it with a
:class:`~vitavla.streaming.StreamingPolicy`), a :class:`~vitavla.streaming.StreamingPolicy`, a teacher's
:class:`~vitavla.rollout.teacher_policy.WindowedTeacherPolicy`, or a scripted stand-in in tests; the last three
already are rollout policies.

Not every member is needed everywhere, so :func:`check_rollout_policy` is told what the caller needs:
``select`` only where several episodes share the policy's batch, ``image_size`` and ``robot`` only where the
caller takes them from the policy (``vitavla test``) instead of from its own arguments. It names the
missing members in a TypeError, before any simulator starts, instead of an AttributeError mid-episode.

This module sits with the core types (it imports only them): rollouts, LightningModules and the policy
server all import it downward.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:
    from vitavla.action_head import ActionOutput
    from vitavla.batch import RobotSpec
    from vitavla.observation import Observation


class RolloutPolicy(Protocol):
    """A policy over a batch of B episodes stepped in lockstep (B = 1 for a sequential rollout).

    ``select``, ``image_size`` and ``robot`` are needed only by some callers (see :func:`check_rollout_policy`).
    """

    image_size: int
    """Side of the square frames the policy takes (observations are resized to it)."""

    robot: RobotSpec
    """The action layout the policy predicts (checked against the env and the checkpoint's normalizer)."""

    def reset(self) -> None:
        """Forget every episode; the next :meth:`step` starts a new batch (every episode, every CALVIN subtask)."""

    def step(self, obs: Observation) -> ActionOutput:
        """Action chunks of the newest step: fields (B, chunk, ·) for the B rows of ``obs``."""

    def select(self, rows: Sequence[int]) -> None:
        """Keep only batch rows ``rows`` (in that order): their episodes go on, the others are dropped."""


METHODS = ("reset", "step")
BATCHED = ("select",)
DESCRIBED = ("image_size", "robot")


def check_rollout_policy(policy, *, batched: bool = False, described: bool = False,
                         source: str | None = None) -> RolloutPolicy:
    """``policy`` itself if it has what the caller needs, else a TypeError naming what is missing.

    ``batched``: several episodes share its batch (it must drop finished ones with ``select(rows)``).
    ``described``: the caller reads ``image_size`` and ``robot`` from it. ``source``: where the policy came
    from, for the message (e.g. ``"FinetuneModule.rollout_policy()"``).
    """
    methods = METHODS + (BATCHED if batched else ())
    missing = [m for m in methods if not callable(getattr(policy, m, None))]
    missing += [a for a in (DESCRIBED if described else ()) if not hasattr(policy, a)]
    if missing:
        what = f"{source} ({type(policy).__name__})" if source else type(policy).__name__
        needs = "reset() and step(obs) -> ActionOutput"
        if batched:
            needs += ", and select(rows) to drop finished episodes from a batch of several"
        if described:
            needs += "; and the attributes image_size (int) and robot (RobotSpec)"
        raise TypeError(f"{what} is not a rollout policy: it lacks {', '.join(missing)}. A rollout policy "
                        f"(vitavla.policy_protocol.RolloutPolicy) has {needs}; a VLAPolicy is streamed into one "
                        "by as_rollout_policy")
    return policy


def as_rollout_policy(policy, *, batched: bool = False, described: bool = False,
                      source: str | None = None) -> RolloutPolicy:
    """``policy`` as a :class:`RolloutPolicy`: a :class:`~vitavla.policy.VLAPolicy` (which computes a whole
    window at once and keeps no history) wrapped in a :class:`~vitavla.streaming.StreamingPolicy`, anything
    else as it is; then checked (:func:`check_rollout_policy`, same arguments)."""
    # An object can only be a VLAPolicy if vitavla.policy is loaded: looking it up in sys.modules keeps the
    # student stack (and transformers) out of processes that only step scripted or teacher policies.
    vla = sys.modules.get("vitavla.policy")
    if vla is not None and isinstance(policy, vla.VLAPolicy):
        from vitavla.streaming import StreamingPolicy

        policy = StreamingPolicy(policy)
    return check_rollout_policy(policy, batched=batched, described=described, source=source)


__all__ = ["RolloutPolicy", "as_rollout_policy", "check_rollout_policy"]
