"""``SeerModel``: Seer's ``SeerAgent`` at evaluation, taking precomputed CLIP text features.

Top-level parameter names are Seer's, so an official finetune checkpoint with its ``module.`` prefix stripped
loads strictly (``vision_encoder.*`` comes from the separate MAE file). Modules the official forward never
calls (``action_pose_encoder``, ``action_gripper_position_encoder``, ``action_projector``, ``recon_*``) are
declared for that reason only.

``arm_dim``, ``gripper_dim`` and the gripper state convention size the state encoder and the action head (e.g.
12 + 2 for a bimanual ALOHA); at their defaults every key and shape is the official one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from teachers.base import ActionHead
from teachers.seer.config import SeerConfig
from teachers.seer.gpt2 import GPT2Backbone
from teachers.seer.mask import seer_attention_mask
from teachers.seer.perceiver import PerceiverResampler
from teachers.seer.vision import Block, MAEEncoder, sincos_pos_embed_2d


@dataclass
class SeerOutput:
    action_query_hidden: Tensor
    """(B, S, P, D): GPT-2 output after ``ln_f`` at the action queries; the distillation target."""
    hidden: Tensor
    """(B, S * T, D): the whole GPT-2 output after ``ln_f``, step-major."""
    arm: Tensor
    """(B, S, P, arm_dim) in [-1, 1]."""
    gripper_logit: Tensor
    """(B, S, P, gripper_dim); Seer's gripper output is its sigmoid."""
    image_pred: Tensor | None = None
    """(B * S, 2, patches, 3 * patch**2) foresight prediction (0 = primary, 1 = wrist), if requested."""

    @property
    def gripper_prob(self) -> Tensor:
        return torch.sigmoid(self.gripper_logit)


def _action_mlp(dim: int) -> nn.Sequential:
    half = dim // 2
    return nn.Sequential(nn.Linear(dim, half), nn.ReLU(), nn.Linear(half, half), nn.ReLU())


class SeerModel(nn.Module):
    def __init__(self, cfg: SeerConfig):
        super().__init__()
        self.cfg = cfg
        d, vit = cfg.hidden_size, cfg.vit_dim
        half = d // 2

        self.vision_encoder = MAEEncoder(cfg.image_size, cfg.patch_size, vit, cfg.vit_depth, cfg.vit_heads,
                                         cfg.vit_mlp_ratio)
        self.vision_encoder.requires_grad_(False)
        self.perceiver_resampler = PerceiverResampler(vit, cfg.num_resampler_queries, cfg.resampler_depth,
                                                      cfg.resampler_dim_head, cfg.resampler_heads,
                                                      cfg.resampler_ff_mult)

        self.text_projector = nn.Linear(cfg.text_dim, d)
        self.arm_state_encoder = nn.Linear(cfg.arm_dim, d)
        self.gripper_state_encoder = nn.Linear(cfg.gripper_features, d)
        self.state_projector = nn.Linear(2 * d, d)
        self.action_pose_encoder = nn.Linear(cfg.arm_dim, d)
        # Unused (see the module doc); sized like one one-hot gripper action per gripper, 2 officially.
        self.action_gripper_position_encoder = nn.Linear(2 * cfg.gripper_dim, d)
        self.action_projector = nn.Linear(2 * d, d)

        self.image_primary_projector = nn.Linear(vit, d)
        self.image_wrist_projector = nn.Linear(vit, d)
        self.cls_token_primary_projector = nn.Linear(vit, d)
        self.cls_token_wrist_projector = nn.Linear(vit, d)

        self.action_pred_token = nn.Parameter(torch.zeros(1, 1, cfg.action_pred_steps, d))
        self.obs_tokens = nn.Parameter(torch.zeros(1, 1, 2 * cfg.num_obs_tokens_per_image, d))
        self.transformer_backbone_position_embedding = nn.Parameter(torch.zeros(1, cfg.sequence_length, 1, d))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))

        self.embedding_layer_norm = nn.LayerNorm(d)
        self.transformer_backbone = GPT2Backbone(d, cfg.num_layers, cfg.num_heads, cfg.dropout)

        # The action decoder is the teacher's ActionHead itself: the same module objects are registered here
        # under Seer's names (for checkpoint keys) and reachable as ``self.action_head`` (for the student).
        head = ActionHead(d, arm_dim=cfg.arm_dim, gripper_dim=cfg.gripper_dim, decoder_width=half)
        self.action_decoder = head.action_decoder
        self.arm_action_decoder = head.arm_action_decoder
        self.gripper_action_decoder = head.gripper_action_decoder
        object.__setattr__(self, "_action_head", head)  # unregistered: its parameters are already ours

        self.recon_state_decoder = _action_mlp(d)
        self.recon_arm_state_decoder = nn.Sequential(nn.Linear(half, cfg.arm_dim), nn.Tanh())
        self.recon_gripper_state_decoder = nn.Sequential(nn.Linear(half, cfg.gripper_dim), nn.Sigmoid())

        self.image_decoder_obs_pred_projector = nn.Linear(d, d)
        self.image_decoder = nn.Sequential(
            *(Block(d, cfg.image_decoder_heads, 4.0) for _ in range(cfg.image_decoder_depth))
        )
        self.image_decoder_norm = nn.LayerNorm(d)
        self.image_decoder_pred = nn.Linear(d, cfg.patch_size**2 * 3)
        # Fixed and in no checkpoint: a sqrt(No) x sqrt(No) grid for the foresight tokens followed by the
        # patch grid for the mask tokens.
        obs_grid = int(round(cfg.num_obs_tokens_per_image**0.5))
        patch_grid = cfg.image_size // cfg.patch_size
        pos = torch.cat([torch.tensor(sincos_pos_embed_2d(d, obs_grid)),
                         torch.tensor(sincos_pos_embed_2d(d, patch_grid))])
        self.register_buffer("image_decoder_position_embedding", pos.unsqueeze(0), persistent=False)

        self._mask_cache: dict[torch.device, Tensor] = {}
        self._init_weights()

    @property
    def action_head(self) -> ActionHead:
        return self._action_head

    def _init_weights(self) -> None:
        # As SeerAgent.initialize_weights: xavier-uniform Linear layers; GPT-2 keeps its normal(0.02) Conv1D
        # init. Only matters for weights no file provides.
        for name, module in self.named_modules():
            if name.startswith("vision_encoder"):
                continue
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.obs_tokens, std=0.02)
        nn.init.normal_(self.transformer_backbone_position_embedding, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def trainable_checkpoint_parameters(self) -> int:
        """Parameters an official checkpoint stores: all but the frozen vision encoder."""
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("vision_encoder."))

    def attention_mask(self, num_steps: int, device: torch.device) -> Tensor:
        """Allowed-attention mask for ``num_steps`` steps: the top-left block of the full-history mask."""
        full = self._mask_cache.get(device)
        if full is None:
            full = self._mask_cache[device] = seer_attention_mask(self.cfg, self.cfg.sequence_length, device)
        n = num_steps * self.cfg.tokens_per_step
        return full[:n, :n]

    def split_state(self, state: Tensor) -> tuple[Tensor, Tensor]:
        """Seer's own state rule: (B, S, arm_dim + gripper_state_values) -> (arm, gripper_features).

        Binary gripper: value < 1 -> class 0 (closed), otherwise class 1 (open), one-hot per gripper, the
        pairs in gripper order (as ``RobotSpec.split_state``); this accepts both Seer's training (0/1) and
        evaluation (-1/+1) conventions. Width gripper: the positions as they are.
        """
        cfg = self.cfg
        expected = cfg.arm_dim + cfg.gripper_state_values
        if state.shape[-1] != expected:
            raise ValueError(f"Seer ({cfg.name}) takes a {expected}-D state (arm {cfg.arm_dim} + gripper "
                             f"{cfg.gripper_state_values}), got {state.shape[-1]}")
        arm, grip = state[..., : cfg.arm_dim], state[..., cfg.arm_dim :]
        if not cfg.gripper_width:
            grip = F.one_hot((grip >= 1).long(), num_classes=2).to(state.dtype).flatten(-2)
        return arm, grip

    def forward(self, image_primary: Tensor, image_wrist: Tensor, state: Tensor, text_features: Tensor,
                predict_images: bool = False) -> SeerOutput:
        """Official-convention entry point; see :meth:`forward_features` for shapes."""
        arm, grip = self.split_state(state)
        return self.forward_features(image_primary, image_wrist, arm, grip, text_features, predict_images)

    def forward_features(self, image_primary: Tensor, image_wrist: Tensor, arm_state: Tensor,
                         gripper_features: Tensor, text_features: Tensor,
                         predict_images: bool = False) -> SeerOutput:
        """image_*: (B, S, 3, H, W) CLIP-normalised; arm_state (B, S, arm_dim); gripper_features
        (B, S, cfg.gripper_features), 2 for the released models;
        text_features (B, S, text_dim), the CLIP text embedding at the input of ``text_projector``.
        """
        cfg = self.cfg
        b, s = image_primary.shape[:2]
        if s > cfg.sequence_length:
            raise ValueError(f"Seer ({cfg.name}) has a history of {cfg.sequence_length} steps, got {s}")
        for name, x, last in (("image_wrist", image_wrist, None), ("arm_state", arm_state, cfg.arm_dim),
                              ("gripper_features", gripper_features, cfg.gripper_features),
                              ("text_features", text_features, cfg.text_dim)):
            if tuple(x.shape[:2]) != (b, s) or (last is not None and x.shape[-1] != last):
                raise ValueError(f"{name} has shape {tuple(x.shape)}; expected (B={b}, S={s}, ...)"
                                 + (f" with last dim {last}" if last is not None else ""))

        text = self.text_projector(text_features).unsqueeze(2)
        arm = self.arm_state_encoder(arm_state)
        grip = self.gripper_state_encoder(gripper_features)
        state = self.state_projector(torch.cat([arm, grip], dim=-1)).unsqueeze(2)

        with torch.no_grad():
            vit = self.vision_encoder(torch.cat([image_primary.flatten(0, 1), image_wrist.flatten(0, 1)]))
        vit = vit.to(text.dtype)
        # One resampler serves both cameras, so both go through it in one batch.
        latents = self.perceiver_resampler(vit[:, 1:]).unflatten(0, (2, b, s))
        cls = vit[:, 0].unflatten(0, (2, b, s))
        tokens = torch.cat([
            text,
            state,
            self.image_primary_projector(latents[0]),
            self.image_wrist_projector(latents[1]),
            self.cls_token_primary_projector(cls[0]).unsqueeze(2),
            self.cls_token_wrist_projector(cls[1]).unsqueeze(2),
            self.obs_tokens.expand(b, s, -1, -1),
            self.action_pred_token.expand(b, s, -1, -1),
        ], dim=2)
        # One position vector per step, shared by all its tokens; shorter windows use the first rows.
        tokens = tokens + self.transformer_backbone_position_embedding[:, :s]
        x = self.embedding_layer_norm(tokens.flatten(1, 2))
        hidden = self.transformer_backbone(x, self.attention_mask(s, x.device))

        per_step = hidden.unflatten(1, (s, cfg.tokens_per_step))
        a0 = cfg.action_token_start
        action_hidden = per_step[:, :, a0 : a0 + cfg.action_pred_steps]
        actions = self.action_head(action_hidden)
        image_pred = None
        if predict_images:
            o0 = cfg.obs_token_start
            image_pred = self.decode_images(per_step[:, :, o0 : o0 + 2 * cfg.num_obs_tokens_per_image])
        return SeerOutput(action_hidden, hidden, actions.arm, actions.gripper_logit, image_pred)

    def decode_images(self, obs_hidden: Tensor) -> Tensor:
        """Foresight head: (B, S, 2 * No, D) query outputs -> (B * S, 2, patches, 3 * patch**2)."""
        cfg = self.cfg
        b, s = obs_hidden.shape[:2]
        x = self.image_decoder_obs_pred_projector(obs_hidden)
        x = x.reshape(b * s * 2, cfg.num_obs_tokens_per_image, cfg.hidden_size)
        masks = self.mask_token.expand(x.shape[0], cfg.num_patches, -1)
        x = torch.cat([x, masks], dim=1) + self.image_decoder_position_embedding
        x = self.image_decoder(x)[:, -cfg.num_patches :]
        x = self.image_decoder_pred(self.image_decoder_norm(x))
        return x.reshape(b * s, 2, cfg.num_patches, -1)
