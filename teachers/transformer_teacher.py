"""A small causal transformer teacher: a second action expert, so that swapping teachers is a YAML line.

Unlike Seer it needs no tokenizer, no pretrained vision tower and no future-frame objective, which makes
it cheap enough to train from scratch on CPU (demo and tests) while exercising the whole teacher contract.

Per step it builds ``4 + Q`` tokens: the instruction, one token per camera view, the robot state, and
``Q`` learned action queries. A transformer runs over all steps with a block-causal mask: observation
tokens of step ``t`` see the observation tokens of steps ``<= t``; the queries of step ``t`` see those and
each other, and nobody sees another step's queries. Outputs at ``t`` therefore depend only on steps ``<= t``,
as a streaming policy requires.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from teachers.base import ActionHead, Teacher
from vitavla.batch import RobotSpec, Window
from vitavla.checkpoint_io import check_fit, missing_checkpoint, read_state_dict

_OBS_TOKENS = 4  # instruction, view 0, view 1, state
_WORD_BUCKETS = 4096
_MAX_INSTRUCTION_BYTES = 256


class _ViewEncoder(nn.Module):
    """uint8-normalized image -> one token, keeping coarse layout (where things are) in a 4x4 pooled grid."""

    def __init__(self, hidden_size: int, image_size: int, channels: int = 32, grid: int = 4):
        super().__init__()
        # A 14x14 patch grid at any image size: 16-pixel patches at 224, like a ViT-B/16 stem.
        patch = max(1, image_size // 14)
        self.stem = nn.Conv2d(3, channels, kernel_size=patch, stride=patch)
        self.grid = grid
        self.proj = nn.Sequential(nn.Linear(channels * grid * grid, hidden_size), nn.GELU(),
                                  nn.Linear(hidden_size, hidden_size))

    def forward(self, pixels: Tensor) -> Tensor:
        x = F.gelu(self.stem(pixels))
        x = F.adaptive_avg_pool2d(x, self.grid)
        return self.proj(x.flatten(1))


def _instruction_ids(text: str) -> list[int]:
    """UTF-8 bytes (0..255) plus hashed lower-case words (256..).

    Order-free like the bytes, but the word ids tell "red" from "bed"."""
    ids = list(text.encode("utf-8")[:_MAX_INSTRUCTION_BYTES])
    # crc32, not hash(): Python salts str hashes per process, which would break saved checkpoints.
    ids += [256 + zlib.crc32(w.encode("utf-8")) % _WORD_BUCKETS for w in text.lower().split()]
    return ids or [0]


class TransformerTeacher(Teacher):
    """Small causal transformer action model with its own :class:`~teachers.base.ActionHead`.

    Args:
        hidden_size: width ``D`` of every token and of the returned hidden states.
        num_layers, num_heads: transformer depth and attention heads (``hidden_size % num_heads == 0``).
        image_size: side of the square uint8 images it reads.
        max_steps: longest window (length of the step embedding).
        arm_dim, gripper_dim, gripper_state, gripper_state_dim: the robot, see :class:`~vitavla.batch.RobotSpec`.
        action_chunk: actions predicted per step; also the number of action queries ``Q``.
        checkpoint: ``.safetensors`` file (or a directory holding ``model.safetensors``) or a
            ``.pt``/``.ckpt`` state dict, possibly a Lightning checkpoint whose keys carry a prefix such
            as ``teacher.``.
        seed: initialization seed, so two teachers built from the same YAML are identical.
    """

    def __init__(self, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, image_size: int = 224,
                 max_steps: int = 16, arm_dim: int = 6, gripper_dim: int = 1, gripper_state: str = "binary",
                 action_chunk: int = 3, checkpoint: str | None = None, seed: int = 0,
                 gripper_state_dim: int | None = None):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
        self.robot = RobotSpec(arm_dim=arm_dim, gripper_dim=gripper_dim, gripper_state=gripper_state,
                               gripper_state_dim=gripper_state_dim, action_chunk=action_chunk)
        self.hidden_size = hidden_size
        self.num_action_queries = action_chunk
        self.image_size = image_size
        self.max_steps = max_steps
        self.config = dict(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                           image_size=image_size, max_steps=max_steps, arm_dim=arm_dim,
                           gripper_dim=gripper_dim, gripper_state=gripper_state, action_chunk=action_chunk,
                           gripper_state_dim=gripper_state_dim)

        # Forked RNG: building a teacher must not shift the global random stream of the run that builds it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            d = hidden_size
            self.views = nn.ModuleList([_ViewEncoder(d, image_size) for _ in range(2)])
            self.instruction_embed = nn.EmbeddingBag(256 + _WORD_BUCKETS, d, mode="mean")
            state_in = arm_dim + self.robot.gripper_features
            self.state_mlp = nn.Sequential(nn.Linear(state_in, d), nn.GELU(), nn.Linear(d, d))
            self.action_queries = nn.Parameter(torch.randn(action_chunk, d) * 0.02)
            self.step_embed = nn.Parameter(torch.randn(max_steps, d) * 0.02)
            self.token_type_embed = nn.Parameter(torch.randn(_OBS_TOKENS + action_chunk, d) * 0.02)
            layer = nn.TransformerEncoderLayer(d, num_heads, dim_feedforward=4 * d, dropout=0.0,
                                               activation="gelu", batch_first=True, norm_first=True)
            self.transformer = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
            self.final_norm = nn.LayerNorm(d)
            self.action_head = ActionHead(d, arm_dim=arm_dim, gripper_dim=gripper_dim)

        if checkpoint is not None:
            self.load_checkpoint(checkpoint)

    @property
    def device(self) -> torch.device:
        return self.step_embed.device

    # ------------------------------------------------------------------ forward

    def _attention_mask(self, steps: int) -> Tensor:
        """Boolean (L, L) mask, True = blocked, for ``steps`` blocks of ``4 + Q`` tokens (see module doc)."""
        per = _OBS_TOKENS + self.num_action_queries
        step = torch.arange(steps, device=self.device).repeat_interleave(per)
        is_query = (torch.arange(per, device=self.device) >= _OBS_TOKENS).repeat(steps)
        key_visible_obs = (step[None, :] <= step[:, None]) & ~is_query[None, :]
        own_queries = is_query[:, None] & is_query[None, :] & (step[None, :] == step[:, None])
        return ~(key_visible_obs | own_queries)

    def _embed_instructions(self, texts: list[str]) -> Tensor:
        ids = [_instruction_ids(t) for t in texts]
        flat = torch.tensor([i for seq in ids for i in seq], dtype=torch.long, device=self.device)
        offsets = torch.tensor([0] + [len(s) for s in ids[:-1]], device=self.device).cumsum(0)
        return self.instruction_embed(flat, offsets)

    def encode(self, window: Window) -> Tensor:
        # Through __call__ so module hooks (DeepSpeed, profilers, torch.compile wrappers) see the forward.
        return self(window)

    def forward(self, window: Window) -> Tensor:
        """Hidden states at the action queries, (B, T, Q, D); step t depends on steps <= t only."""
        self.check_window(window)
        b, t = window.batch_size, window.num_steps
        dtype = self.step_embed.dtype
        # Normalize after the move: uint8 is 4x cheaper to transfer than float.
        images = window.images.to(self.device, non_blocking=True).to(dtype).div_(127.5).sub_(1.0)
        views = [enc(images[:, :, v].flatten(0, 1)).view(b, t, -1) for v, enc in enumerate(self.views)]
        arm, grip = self.robot.split_state(window.state.to(self.device, dtype))
        state = self.state_mlp(torch.cat([arm, grip], dim=-1))
        instr = self._embed_instructions(window.instruction).to(dtype)[:, None].expand(b, t, -1)
        queries = self.action_queries[None, None].expand(b, t, -1, -1)
        tokens = torch.cat([torch.stack([instr, *views, state], dim=2), queries], dim=2)  # (B, T, 4+Q, D)
        tokens = tokens + self.token_type_embed + self.step_embed[:t, None]
        hidden = self.transformer(tokens.flatten(1, 2), mask=self._attention_mask(t))
        hidden = hidden.view(b, t, _OBS_TOKENS + self.num_action_queries, -1)[:, :, _OBS_TOKENS:]
        return self.final_norm(hidden)

    def extra_repr(self) -> str:
        c = self.config
        return (f"hidden_size={c['hidden_size']}, num_layers={c['num_layers']}, max_steps={c['max_steps']}, "
                f"image_size={c['image_size']}")

    # ------------------------------------------------------------------ checkpoints

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the weights as safetensors (+ config metadata); a directory gets ``model.safetensors``."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            path.mkdir(parents=True, exist_ok=True)
            path = path / "model.safetensors"
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"config": json.dumps(self.config), "format": "pt",
                                               "class": type(self).__name__})
        return path

    def load_checkpoint(self, checkpoint: str | Path) -> TransformerTeacher:
        """Load weights; fail with one message listing every missing, unexpected or mis-shaped tensor."""
        path = Path(checkpoint)
        if path.is_dir():
            path = path / "model.safetensors"
        if not path.is_file():
            raise missing_checkpoint(path, "TransformerTeacher checkpoint")
        saved_config = None
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            saved_config = json.loads(meta["config"]) if "config" in meta else None
        state = self._strip_prefix(read_state_dict(path))
        notes = []
        if saved_config is not None:
            diff = {k: (v, self.config.get(k)) for k, v in saved_config.items() if self.config.get(k) != v}
            if diff:
                notes.append("the checkpoint was saved with a different config (saved, this model): "
                             + ", ".join(f"{k}=({a}, {b})" for k, (a, b) in diff.items()))
        check_fit(state, {k: v.shape for k, v in self.state_dict().items()}, path, "TransformerTeacher", notes)
        self.load_state_dict(state)
        return self

    def _strip_prefix(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Keep the keys under the prefix (``teacher.``, ``model.``, ...) that matches most own keys."""
        own = set(self.state_dict())
        hits = {"": len(own & set(state))} if own & set(state) else {}
        for key in state:
            names = [n for n in own if key.endswith("." + n)]
            if names:
                prefix = key[: -len(max(names, key=len))]
                hits[prefix] = hits.get(prefix, 0) + 1
        if not hits:
            return state  # nothing matches: report everything as missing/unexpected
        prefix = max(hits, key=lambda p: (hits[p], -len(p)))
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


__all__ = ["TransformerTeacher"]
