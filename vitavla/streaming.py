"""Streaming inference: one observation in, one action chunk out, past steps kept in a KV cache.

Why it is exact: with the ``action_isolated`` mask no token attends to an earlier step's action tokens, so
after reading a step's action outputs their keys and values are cropped from the cache, and the cache then
holds exactly the observation tokens a full-window forward would attend to, at the same rotary positions.
A new step costs one language-model pass over that step's tokens (P of them) against the cache instead of a
pass over all T * P tokens of the window; image and instruction embeddings are computed once per frame and
kept, never recomputed.

Window overflow (the refill policy): a full-window forward over ``max_steps`` steps puts the oldest kept
step at position 0. Rotary positions are baked into cached keys, so the oldest step cannot be dropped from
the front of the cache. When a step arrives and ``max_steps`` steps are already held, the cache is rebuilt
from the most recent ``max_steps - refill_block`` steps (from their stored embeddings: no vision work), then
the new step is appended. The context therefore cycles between ``max_steps - refill_block + 1`` and
``max_steps`` steps, and every output equals a full-window forward over exactly the steps held. Cost per
step: one P-token pass, plus once every ``refill_block`` steps a prefill of ``(max_steps - refill_block) * P``
tokens; ``refill_block = 1`` reproduces a sliding window of exactly ``max_steps`` steps at the price of a
prefill every step, ``refill_block = max_steps`` restarts the history.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

import torch
from torch import Tensor

from vitavla.action_head import ActionOutput
from vitavla.batch import BatchError
from vitavla.observation import Observation  # re-exported: vitavla.streaming.Observation keeps working
from vitavla.policy import VLAPolicy
from vitavla.sequence import ACTION, TEXT, TokenMeta, additive_mask, allowed_attention, positions_from_real
from vitavla.student import StepBlocks


def _batchable(streams: Sequence[StreamingPolicy], blocks: Sequence[StepBlocks]) -> bool:
    """Whether :meth:`StreamingPolicy.step_many` can put these streams in one call: one policy, batch rows of
    one, and transformers dynamic caches with the same layers."""
    from transformers.cache_utils import DynamicLayer

    first = streams[0]
    n_layers = len(getattr(first._cache, "layers", ()))
    return n_layers > 0 and all(
        s.policy is first.policy and b.embeds.shape[0] == 1
        and len(getattr(s._cache, "layers", ())) == n_layers
        and all(type(lay) is DynamicLayer for lay in s._cache.layers)
        for s, b in zip(streams, blocks))


class StreamingPolicy:
    """Keeps the history of one batch of episodes; :meth:`step` returns the action chunk of the newest step.

    The batch is fixed by the first :meth:`step` after :meth:`reset`; :meth:`select` drops rows whose episode
    ended (batched evaluation, :mod:`vitavla.rollout.parallel`).
    """

    def __init__(self, policy: VLAPolicy, max_steps: int | None = None, refill_block: int | None = None):
        self.policy = policy
        self.student = policy.student
        self.max_steps = max_steps or self.student.max_steps
        self.refill_block = refill_block or max(1, self.max_steps // 2)
        if not 1 <= self.refill_block <= self.max_steps:
            raise ValueError(f"refill_block must be in [1, max_steps={self.max_steps}], got {self.refill_block}")
        self.reset()

    def reset(self) -> None:
        """Forget the episode: call at the start of every episode (and every CALVIN subtask)."""
        self._history: deque[StepBlocks] = deque()
        self._cache = None
        self._keys: TokenMeta | None = None
        self._next_pos: Tensor | None = None
        self._next_order = 0
        self._instruction: list[str] | None = None
        self._text: tuple[Tensor, Tensor] | None = None
        self.refills = 0

    @property
    def robot(self):
        """The student's :class:`~vitavla.batch.RobotSpec` (action layout the env must accept)."""
        return self.student.robot

    @property
    def image_size(self) -> int:
        """Side length, in pixels, the observations' images are resized to."""
        return self.student.backbone.image_size

    @torch.no_grad()
    def select(self, rows: Sequence[int]) -> None:
        """Keep only batch rows ``rows`` (in that order) of the running episodes; the others are dropped.

        Every per-row piece of state is index-selected (KV cache, stored step blocks, instruction embeddings,
        key bookkeeping, next positions), so the kept rows continue exactly as if they had run alone: rows
        never interact (padding is masked and does not advance positions). Instruction padding columns that
        only dropped rows needed stay in the cache, masked. Before the first :meth:`step` there is no batch
        yet and this is a no-op.
        """
        if self._instruction is None:
            return
        b = len(self._instruction)
        rows = [int(r) for r in rows]
        if not rows or len(set(rows)) != len(rows) or not all(0 <= r < b for r in rows):
            raise ValueError(f"select(rows) needs distinct row indices in [0, {b}), got {rows}")
        if rows == list(range(b)):
            return
        text, text_real = self._text
        idx = torch.tensor(rows, dtype=torch.long, device=text.device)
        self._instruction = [self._instruction[r] for r in rows]
        self._text = (text[idx], text_real[idx])
        self._history = deque(StepBlocks(blk.embeds[idx], blk.kind, blk.real[idx]) for blk in self._history)
        if self._cache is not None:
            self._cache.batch_select_indices(idx)
        if self._keys is not None:
            self._keys = TokenMeta(self._keys.kind[idx], self._keys.real[idx], self._keys.order[idx])
        if self._next_pos is not None:
            self._next_pos = self._next_pos[idx]

    @property
    def instruction(self) -> list[str] | None:
        """The instructions of the running episodes (None before the first step)."""
        return self._instruction

    @property
    def held_steps(self) -> int:
        return len(self._history)

    @property
    def cached_tokens(self) -> int:
        return 0 if self._cache is None else self._cache.get_seq_length()

    @torch.no_grad()
    def step(self, obs: Observation, image_embeds: Tensor | None = None) -> ActionOutput:
        """Actions for the newest step: fields (B, action_chunk, ·).

        ``image_embeds``: ``student.embed_images(obs.images[:, None])`` computed by the caller, so that one
        vision pass can serve several independent streams (the policy server batches its sessions' frames).
        """
        block = self._begin(obs, image_embeds)
        return self._end(block, self._append(block))

    def _begin(self, obs: Observation, image_embeds: Tensor | None) -> StepBlocks:
        """Check ``obs``, build its step block and make room in the cache (refill); nothing appended yet."""
        student = self.student
        self._check(obs)
        if self._instruction is None:
            self._instruction = list(obs.instruction)
            self._text = student.embed_instruction(self._instruction)
        elif list(obs.instruction) != self._instruction:
            raise BatchError("the instruction changed mid-episode; call reset() before a new instruction")
        text, text_real = self._text
        per_step = student.instruction_per_step
        if image_embeds is None:
            image_embeds = student.embed_images(obs.images[:, None])
        block = student.step_blocks(image_embeds, obs.state[:, None],
                                    text if per_step else None, text_real if per_step else None)
        if self._cache is None or self.held_steps >= self.max_steps:
            keep = 0 if self._cache is None else self.max_steps - self.refill_block
            self._history = deque(list(self._history)[self.held_steps - keep:])
            self._refill(list(self._history))
        return block

    def _end(self, block: StepBlocks, hidden: Tensor) -> ActionOutput:
        self._history.append(block)
        c = self.student.robot.action_chunk
        return self.policy.decode(hidden[:, -c:])

    @staticmethod
    @torch.no_grad()
    def step_many(streams: Sequence[StreamingPolicy], observations: Sequence[Observation],
                  image_embeds: Sequence[Tensor | None] | None = None) -> list[ActionOutput]:
        """:meth:`step` of several independent streams (each its own episode, cache length and instruction)
        in one language-model call; returns what each ``stream.step(obs)`` would.

        The streams' new tokens are padded to the longest and their caches to the longest cache; padding is
        masked out of every row's attention (keys) and dropped from the outputs and from the caches written
        back, so each row attends to exactly its own tokens at its own positions. Streams that do not share
        one policy, or caches other than transformers' dynamic ones, are stepped one by one.
        """
        embeds_in = list(image_embeds) if image_embeds is not None else [None] * len(streams)
        if len(streams) != len(observations) or len(embeds_in) != len(streams):
            raise ValueError(f"step_many got {len(streams)} streams, {len(observations)} observations and "
                             f"{len(embeds_in)} image embeddings")
        blocks = [s._begin(o, e) for s, o, e in zip(streams, observations, embeds_in)]
        if len(streams) < 2 or not _batchable(streams, blocks):
            return [s._end(b, s._append(b)) for s, b in zip(streams, blocks)]
        first = streams[0]
        metas = [s._meta(b) for s, b in zip(streams, blocks)]
        positions = [positions_from_real(m.real, s._next_pos) for s, m in zip(streams, metas)]
        keys = [m if s._keys is None else s._keys.cat(m) for s, m in zip(streams, metas)]
        allowed = [allowed_attention(m, k, first.student.attention) for m, k in zip(metas, keys)]
        past = [s.cached_tokens for s in streams]
        lengths = [m.length for m in metas]
        n, p_max, k_max = len(streams), max(lengths), max(past)
        ref = blocks[0].embeds
        embeds = ref.new_zeros(n, p_max, ref.shape[-1])
        pos = torch.zeros(n, p_max, dtype=torch.long, device=ref.device)
        allow = torch.zeros(n, p_max, k_max + p_max, dtype=torch.bool, device=ref.device)
        for i, (b, a, p, k, ln) in enumerate(zip(blocks, allowed, positions, past, lengths)):
            embeds[i, :ln] = b.embeds[0, 0]
            pos[i, :ln] = p[0]
            allow[i, :ln, :k] = a[0, :, :k]
            allow[i, :ln, k_max:k_max + ln] = a[0, :, k:]
            pad = torch.arange(ln, p_max, device=ref.device)
            allow[i, pad, k_max + pad] = True  # padded queries see themselves only (no all-masked row)
        cache = first.student.backbone.new_cache()
        for layer_idx in range(len(first._cache.layers)):
            filled = [s._cache.layers[layer_idx] for s in streams]
            src = next((lay for lay in filled if lay.get_seq_length() > 0), None)
            if src is None:  # every cache is empty: no past to pad
                continue
            keys_b = src.keys.new_zeros(n, src.keys.shape[1], k_max, src.keys.shape[3])
            values_b = torch.zeros_like(keys_b)
            for i, lay in enumerate(filled):
                if past[i]:
                    keys_b[i, :, :past[i]] = lay.keys[0]
                    values_b[i, :, :past[i]] = lay.values[0]
            cache.layers[layer_idx].update(keys_b, values_b)
        mask = additive_mask(allow, embeds.dtype)
        out = first.student.backbone(embeds, mask, pos, past_key_values=cache, use_cache=True)
        results = []
        for i, s in enumerate(streams):
            ln = lengths[i]
            for layer_idx, lay in enumerate(out.cache.layers):
                new_k = lay.keys[i:i + 1, :, k_max:k_max + ln]
                new_v = lay.values[i:i + 1, :, k_max:k_max + ln]
                s._cache.layers[layer_idx].update(new_k, new_v)
            s._keys = keys[i]
            s._next_order += ln
            s._next_pos = positions[i][:, -1] + 1
            s._drop_action_keys()
            results.append(s._end(blocks[i], out.hidden[i:i + 1, :ln]))
        return results

    # -- cache bookkeeping -------------------------------------------------------------------------
    def _meta(self, block: StepBlocks) -> TokenMeta:
        b, _, p = block.real.shape
        kind = block.kind[None].expand(b, p)
        order = torch.arange(self._next_order, self._next_order + p, device=kind.device)[None].expand(b, p)
        return TokenMeta(kind, block.real[:, 0], order)

    def _run(self, embeds: Tensor, queries: TokenMeta, positions: Tensor) -> Tensor:
        keys = queries if self._keys is None else self._keys.cat(queries)
        mask = additive_mask(allowed_attention(queries, keys, self.student.attention), embeds.dtype)
        out = self.student.backbone(embeds, mask, positions, past_key_values=self._cache, use_cache=True)
        self._cache = out.cache
        self._keys = keys
        self._next_order += embeds.shape[1]
        return out.hidden

    def _drop_action_keys(self) -> None:
        """Action tokens are invisible to later tokens, so their keys are dead weight in the cache."""
        if self.student.attention != "action_isolated":
            return
        c = self.student.robot.action_chunk
        self._cache.crop(-c)
        self._keys = self._keys.keep(torch.arange(self._keys.length - c, device=self._keys.kind.device))

    def _append(self, block: StepBlocks) -> Tensor:
        meta = self._meta(block)
        positions = positions_from_real(meta.real, self._next_pos)
        hidden = self._run(block.embeds[:, 0], meta, positions)
        self._next_pos = positions[:, -1] + 1
        self._drop_action_keys()
        return hidden

    def _refill(self, kept: list[StepBlocks]) -> None:
        """Rebuild the cache from the instruction prefix (if any) and the kept steps' observation tokens."""
        student = self.student
        self.refills += self._cache is not None
        self._cache = student.backbone.new_cache()
        self._keys, self._next_order = None, 0
        text, text_real = self._text
        b = text.shape[0]
        embeds, metas, reals = [], [], []
        if not student.instruction_per_step:
            kind = torch.full_like(text_real, TEXT, dtype=torch.long)
            order = torch.arange(text.shape[1], device=text.device)[None].expand(b, -1)
            embeds.append(text)
            metas.append(TokenMeta(kind, text_real, order))
            reals.append(text_real)
            self._next_order = text.shape[1]
        for blk in kept:
            meta = self._meta(blk)
            self._next_order += meta.length
            embeds.append(blk.embeds[:, 0])
            metas.append(meta)
            reals.append(meta.real)
        if not embeds:
            self._next_pos = torch.zeros(b, dtype=torch.long, device=text.device)
            return
        seq, real = torch.cat(embeds, 1), torch.cat(reals, 1)
        meta = metas[0]
        for m in metas[1:]:
            meta = meta.cat(m)
        positions = positions_from_real(real)
        self._next_pos = positions[:, -1] + 1
        order_after = self._next_order
        if student.attention == "action_isolated":
            # Old action tokens shape only the numbering (positions computed above), never the outputs.
            keep = (meta.kind[0] != ACTION).nonzero().squeeze(1)
            seq, meta, positions = seq[:, keep], meta.keep(keep), positions[:, keep]
        self._next_order = 0
        self._run(seq, meta, positions)
        self._next_order = order_after

    def _check(self, obs: Observation) -> None:
        s = self.student
        if obs.images.dim() != 5 or obs.images.dtype != torch.uint8:
            raise BatchError(f"Observation.images must be uint8 (B, V, 3, H, W), got {obs.images.dtype} "
                             f"{tuple(obs.images.shape)}")
        b = obs.images.shape[0]
        if obs.state.shape != (b, s.robot.state_dim):
            raise BatchError(f"Observation.state has shape {tuple(obs.state.shape)}, expected "
                             f"({b}, {s.robot.state_dim})")
        if len(obs.instruction) != b:
            raise BatchError(f"Observation.instruction has {len(obs.instruction)} strings for {b} images")
