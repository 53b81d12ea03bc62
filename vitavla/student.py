"""The VITA-VLA student: a VLM backbone plus a state encoder and a learnable action token.

Follow a batch: :meth:`VLAStudent.forward` embeds the two views of every step (``tokens_per_image`` each),
the instruction, the robot state (one token) and ``action_chunk`` copies of the action token, lays them out
as in :mod:`vitavla.sequence`, runs the language model once over the flattened window, and returns the last
hidden states at the action tokens, (B, T, C, hidden). :class:`ActionMapper` takes those into the teacher's
width, where the teacher's own :class:`~teachers.base.ActionHead` decodes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vitavla.backbones.base import Backbone
from vitavla.batch import RobotSpec, Window
from vitavla.feature_cache import ImageFeatureCache
from vitavla.sequence import (ACTION, IMAGE, STATE, TEXT, AttentionMode, TokenMeta, additive_mask,
                              allowed_attention, positions_from_real)


class StateEncoder(nn.Module):
    """Arm -> Linear, gripper (one-hot or widths) -> Linear, concatenate, Linear -> one LLM-width token."""

    def __init__(self, robot: RobotSpec, hidden_size: int):
        super().__init__()
        self.robot = robot
        self.arm_encoder = nn.Linear(robot.arm_dim, hidden_size)
        self.gripper_encoder = nn.Linear(robot.gripper_features, hidden_size)
        self.projector = nn.Linear(2 * hidden_size, hidden_size)

    def forward(self, state: Tensor) -> Tensor:
        arm, grip = self.robot.split_state(state)
        dtype = self.projector.weight.dtype
        return self.projector(torch.cat([self.arm_encoder(arm.to(dtype)), self.gripper_encoder(grip.to(dtype))], -1))


class ActionMapper(nn.Module):
    """3-layer MLP from the LLM width to the teacher's hidden size (hidden width defaults to the output)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None):
        super().__init__()
        hid = hidden_dim or out_dim
        self.in_dim, self.out_dim = in_dim, out_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hid), nn.GELU(), nn.Linear(hid, hid), nn.GELU(),
                                 nn.Linear(hid, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.to(self.net[0].weight.dtype))


@dataclass
class StepBlocks:
    """Embeddings and bookkeeping of T consecutive step blocks, before flattening."""

    embeds: Tensor  # (B, T, P, H)
    kind: Tensor  # (P,)
    real: Tensor  # (B, T, P)


class VLAStudent(nn.Module):
    """Backbone + state encoder + action token; returns hidden states at the action tokens."""

    def __init__(
        self,
        backbone: Backbone,
        arm_dim: int = 6,
        gripper_dim: int = 1,
        gripper_state: str = "binary",
        gripper_state_dim: int | None = None,
        action_chunk: int = 3,
        max_steps: int = 10,
        instruction_per_step: bool = True,
        attention: AttentionMode = "action_isolated",
        max_instruction_tokens: int = 48,
        num_views: int = 2,
        cache_image_features: bool = False,
    ):
        """
        Args:
            backbone: the VLM adapter (``InternVLBackbone``, ``LlavaBackbone``, ...).
            arm_dim: arm values in state and action (6 single-arm, 12 bimanual).
            gripper_dim: gripper action values (1 single-arm, 2 bimanual).
            gripper_state: ``binary`` (open/closed, one-hot encoded) or ``width`` (raw finger positions).
            gripper_state_dim: gripper values in the state, when not the default for ``gripper_state``.
            action_chunk: future actions predicted per step, one action token each.
            max_steps: longest history window (10 on CALVIN, 7 on LIBERO).
            instruction_per_step: repeat the instruction tokens in every step (paper) or put them once in front.
            attention: ``action_isolated`` (nothing attends to action tokens) or plain ``causal`` (ablation).
            max_instruction_tokens: instructions are truncated to this many tokens.
            num_views: camera views per step.
            cache_image_features: keep the frozen vision tower's output per image (keyed by its pixels) and
                compute only images not seen before: a training step then pays only for its trainable parts.
                Used only in training mode while the tower is fixed (:meth:`vision_is_fixed`; a rollout's frames
                are new every step); kept in memory (:mod:`vitavla.feature_cache`), so for small image sets
                such as the quickstart's demos.
        """
        super().__init__()
        if attention not in ("action_isolated", "causal"):
            raise ValueError(f"VLAStudent.attention must be 'action_isolated' or 'causal', got {attention!r}")
        self.backbone = backbone
        self.robot = RobotSpec(arm_dim=arm_dim, gripper_dim=gripper_dim, gripper_state=gripper_state,
                               gripper_state_dim=gripper_state_dim, action_chunk=action_chunk)
        self.hidden_size = backbone.hidden_size
        self.max_steps = max_steps
        self.instruction_per_step = instruction_per_step
        self.attention = attention
        self.max_instruction_tokens = max_instruction_tokens
        self.num_views = num_views
        self.state_encoder = StateEncoder(self.robot, self.hidden_size)
        # One learnable token, repeated per chunk entry; the copies differ only by their rotary positions.
        # Registered empty, then drawn: the values equal randn * 0.02 for the same seed, and a policy built
        # with its parameters on the meta device (loading an exported policy) draws nothing here.
        self.action_token = nn.Parameter(torch.empty(self.hidden_size))
        nn.init.normal_(self.action_token, std=0.02)
        self._token_ids: dict[str, list[int]] = {}
        self.image_cache = ImageFeatureCache() if cache_image_features else None
        # New weights in the tower make every cached output stale.
        self.register_load_state_dict_post_hook(lambda module, incompatible: module.clear_image_cache())

    # -- embedding pieces -------------------------------------------------------------------------
    def instruction_tokens(self, instructions: list[str]) -> tuple[Tensor, Tensor]:
        """Token ids (B, L) padded with 0 and a real-token mask (B, L); tokenization is cached per string."""
        missing = [s for s in dict.fromkeys(instructions) if s not in self._token_ids]
        if missing:
            for s, ids in zip(missing, self.backbone.tokenize(missing)):
                self._token_ids[s] = list(ids)[: self.max_instruction_tokens] or [0]
        rows = [self._token_ids[s] for s in instructions]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        real = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            real[i, : len(r)] = True
        device = self.action_token.device
        return ids.to(device), real.to(device)

    def embed_images(self, images: Tensor) -> Tensor:
        """uint8 (B, T, V, 3, H, W) -> (B, T, V * tokens_per_image, hidden)."""
        b, t, v = images.shape[:3]
        flat = images.to(self.action_token.device, non_blocking=True).flatten(0, 2)
        if self.image_cache is not None and self.training and self.vision_is_fixed():
            emb = self.image_cache(flat, self.backbone.embed_images)
        else:
            emb = self.backbone.embed_images(flat)
        return emb.reshape(b, t, v * emb.shape[1], emb.shape[2])

    def vision_is_fixed(self) -> bool:
        """Whether the vision tower gives each image one output: every parameter frozen, every module in eval
        mode (no dropout). Image features are cached only then."""
        modules = [sub for m in self.backbone.vision_modules() for sub in m.modules()]
        return not any(sub.training for sub in modules) and not any(p.requires_grad for m in modules
                                                                        for p in m.parameters(recurse=False))

    def clear_image_cache(self) -> None:
        if getattr(self, "image_cache", None) is not None:
            self.image_cache.clear()

    def _apply(self, fn, recurse=True):
        self.clear_image_cache()  # another device or dtype: cached outputs would no longer match
        return super()._apply(fn, recurse)

    def embed_instruction(self, instructions: list[str]) -> tuple[Tensor, Tensor]:
        ids, real = self.instruction_tokens(instructions)
        return self.backbone.embed_tokens(ids), real

    def step_blocks(self, image_embeds: Tensor, state: Tensor, text: Tensor | None,
                    text_real: Tensor | None) -> StepBlocks:
        """Assemble T step blocks from image embeds (B, T, VK, H), state (B, T, S) and, when the
        instruction repeats per step, its embeds (B, L, H)."""
        b, t, vk, h = image_embeds.shape
        dtype = image_embeds.dtype
        parts = [image_embeds]
        kinds = [torch.full((vk,), IMAGE)]
        reals = [torch.ones(b, t, vk, dtype=torch.bool, device=image_embeds.device)]
        if text is not None:
            parts.append(text[:, None].expand(b, t, *text.shape[1:]).to(dtype))
            kinds.append(torch.full((text.shape[1],), TEXT))
            reals.append(text_real[:, None].expand(b, t, text.shape[1]))
        c = self.robot.action_chunk
        parts.append(self.state_encoder(state.to(image_embeds.device))[:, :, None].to(dtype))
        parts.append(self.action_token.to(dtype).expand(b, t, c, h))
        kinds += [torch.full((1,), STATE), torch.full((c,), ACTION)]
        reals.append(torch.ones(b, t, 1 + c, dtype=torch.bool, device=image_embeds.device))
        return StepBlocks(torch.cat(parts, dim=2), torch.cat(kinds).to(image_embeds.device), torch.cat(reals, 2))

    def check_window(self, window: Window) -> Window:
        return window.validate(self.robot, num_views=self.num_views, image_size=self.backbone.image_size,
                               max_steps=self.max_steps)

    # -- full-window forward ----------------------------------------------------------------------
    def forward(self, window: Window) -> Tensor:
        """Hidden states at the action tokens of every step, (B, T, action_chunk, hidden)."""
        self.check_window(window)
        text, text_real = self.embed_instruction(window.instruction)
        blocks = self.step_blocks(self.embed_images(window.images), window.state,
                                  text if self.instruction_per_step else None,
                                  text_real if self.instruction_per_step else None)
        b, t, p, h = blocks.embeds.shape
        embeds = blocks.embeds.reshape(b, t * p, h)
        kind = blocks.kind.repeat(t)[None].expand(b, -1)
        real = blocks.real.reshape(b, t * p)
        prefix = 0
        if not self.instruction_per_step:
            prefix = text.shape[1]
            embeds = torch.cat([text.to(embeds.dtype), embeds], dim=1)
            kind = torch.cat([torch.full_like(text_real, TEXT, dtype=kind.dtype), kind], dim=1)
            real = torch.cat([text_real, real], dim=1)
        order = torch.arange(embeds.shape[1], device=embeds.device)[None].expand(b, -1)
        meta = TokenMeta(kind, real, order)
        mask = additive_mask(allowed_attention(meta, meta, self.attention), embeds.dtype)
        out = self.backbone(embeds, mask, positions_from_real(real))
        hidden = out.hidden[:, prefix:].reshape(b, t, p, -1)
        return hidden[:, :, -self.robot.action_chunk:]
