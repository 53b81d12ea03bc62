"""Backbones over stock ``transformers`` LLaVA-style VLMs: the shared machinery and ``LlavaBackbone``.

``HFVLMBackbone`` holds everything that is the same for every "vision tower -> projector -> decoder LLM"
class in ``transformers`` (LLaVA, and InternVL, which HF derives from LLaVA): loading from a local directory
or building a tiny model, normalization, ``get_image_features`` unwrapping, and the decoder forward with our
4-D mask. A family subclass only says how many tokens its connector yields per image.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from abc import abstractmethod
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitavla.backbones.base import Backbone, BackboneOutput, pool_tokens
from vitavla.backbones.tiny import default_image_stats, tiny_llava, tiny_llava_config
from vitavla.images import normalize_images

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
# Only these take an arbitrary additive 4-D mask; FlashAttention-2 supports causal/padding masks only.
_MASKABLE_ATTENTION = ("sdpa", "eager")
# Vision towers without a CLS token: the "default" feature strategy would drop a real patch.
_NO_CLS_TOWERS = ("siglip_vision_model", "siglip2_vision_model")


def parse_dtype(dtype: str) -> torch.dtype:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


def square_side(size) -> int:
    # HF configs store patch/image sizes either as an int or as an (h, w) pair.
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"only square sizes are supported, got {tuple(size)}")
        return int(size[0])
    return int(size)


@functools.cache
def _cache_keyword(decoder: type) -> str:
    """The name of the KV-cache argument of ``decoder.forward``: ``cache`` from transformers 5.24 on, where
    the old ``past_key_values`` warns and is to be removed in 5.40; ``past_key_values`` in 5.20-5.23."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


class HFVLMBackbone(Backbone):
    """A stock ``*ForConditionalGeneration`` VLM behind the ``Backbone`` contract.

    Only ``model.model`` (vision tower, projector, decoder) is kept: the student never uses the lm_head,
    and dropping it saves ~0.5B parameters at 7B scale and keeps unused parameters out of DDP.
    """

    family = "vlm"
    model_type = ""

    def __init__(self, path: str = "tiny", tokens_per_image: int = 49, image_size: int = 224,
                 pool: str = "bilinear", dtype: str = "float32", attn_implementation: str = "sdpa",
                 trust_remote_code: bool = False, image_mean: tuple[float, float, float] | None = None,
                 image_std: tuple[float, float, float] | None = None, gradient_checkpointing: bool = False,
                 init: str = "pretrained"):
        """
        Args:
            path: ``"tiny"`` for a seeded toy model, else a local checkpoint directory (never downloaded).
            tokens_per_image: image tokens per view after pooling the connector's grid (a square; paper: 49).
            image_size: side of the square frames the student sees (paper: 224).
            pool: grid pooling, ``bilinear`` (VITA-1.5's video-frame pooling) or ``avg``.
            dtype: ``float32``, ``bfloat16`` or ``float16`` weights.
            attn_implementation: ``sdpa`` or ``eager`` (both take the custom 4-D mask; flash-attention cannot).
            trust_remote_code: let ``transformers`` run code shipped with the checkpoint (off unless you say so).
            image_mean: per-channel mean in [0, 1] units; default from preprocessor_config.json or the family.
            image_std: per-channel std, likewise.
            gradient_checkpointing: recompute LLM activations in backward (saves memory at 7B).
            init: ``pretrained`` loads the weights; ``random`` builds the architecture from config.json only
                (smoke tests at true shapes, parameter accounting on the meta device).
        """
        super().__init__()
        torch_dtype = parse_dtype(dtype)
        if init not in ("pretrained", "random"):
            raise ValueError(f"init must be 'pretrained' or 'random', got {init!r}")
        if attn_implementation not in _MASKABLE_ATTENTION:
            raise ValueError(f"attn_implementation={attn_implementation!r} cannot take vitavla's custom 4-D "
                             f"attention mask; use one of {_MASKABLE_ATTENTION}")
        if pool not in ("bilinear", "avg"):
            raise ValueError(f"unknown pool {pool!r}; expected 'bilinear' or 'avg'")
        self.path = path
        # Validate sizes against the config before any weights are read: a 7B load takes minutes.
        self.config = self._tiny_config() if path == "tiny" else self._read_config(path)
        self.hidden_size = int(self.config.text_config.hidden_size)
        self.image_size = int(image_size)
        self.pool = pool
        self.native_side = self._native_side(self.image_size)
        self.tokens_per_image = self._check_tokens(int(tokens_per_image))

        if path == "tiny":
            hf = self._build_tiny()
            hf.set_attn_implementation(attn_implementation)
            hf.to(torch_dtype)
            from vitavla.tiny_tokenizer import tiny_tokenizer

            self.tokenizer = tiny_tokenizer()
            stats = {}
        elif init == "random":
            # The real architecture with random weights: smoke tests at true shapes, and parameter
            # accounting on the meta device, from a directory that may hold only config.json.
            hf, self.tokenizer, stats = self._random(path, torch_dtype, attn_implementation, trust_remote_code)
        else:
            hf, self.tokenizer, stats = self._load(path, torch_dtype, attn_implementation, trust_remote_code)
        self.config = hf.config
        self.model = hf.model
        del hf  # frees the lm_head

        default_mean, default_std = default_image_stats(self.config.vision_config.model_type)
        mean = image_mean if image_mean is not None else stats.get("image_mean", default_mean)
        std = image_std if image_std is not None else stats.get("image_std", default_std)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"image_mean/image_std must be 3 values with std > 0, got {mean} / {std}")
        self.image_mean = tuple(float(m) for m in mean)
        self.image_std = tuple(float(s) for s in std)

        if gradient_checkpointing:
            # Non-reentrant checkpointing works with frozen inputs (the vision tokens) and with kwargs.
            # v5 renamed gradient_checkpointing_enable (now a deprecated alias) to
            # activation_checkpointing_enable.
            self.model.language_model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})

    # ---- family hooks -------------------------------------------------------------------------------
    @abstractmethod
    def _tiny_config(self):
        """The config of the seeded toy model built for ``path="tiny"``."""

    @abstractmethod
    def _build_tiny(self) -> nn.Module:
        """The seeded toy ``*ForConditionalGeneration`` (float32)."""

    @abstractmethod
    def _hf_class(self):
        """The ``transformers`` class that loads this family's checkpoints."""

    @abstractmethod
    def _native_side(self, image_size: int) -> int:
        """Side of the square token grid the vision tower + connector yield at ``image_size``."""

    def _vision_kwargs(self) -> dict:
        return {}

    def _model_type_hint(self) -> str:
        return ""

    # ---- construction helpers ------------------------------------------------------------------------
    def _read_config(self, path: str):
        root = Path(path).expanduser()
        name = type(self).__name__
        if not root.is_dir():
            raise FileNotFoundError(
                f"{name}: checkpoint directory {path!r} not found (resolved to {root.resolve()}). vitavla "
                f"never downloads: pass a local directory holding config.json and the weights, "
                f"or path='tiny'.")
        config_file = root / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{name}: {root} has no config.json, so it is not a transformers "
                                    f"checkpoint")
        model_type = json.loads(config_file.read_text()).get("model_type")
        if model_type != self.model_type:
            raise ValueError(f"{name}: {root}/config.json has model_type={model_type!r}, but {name} needs "
                             f"{self.model_type!r}. {self._model_type_hint()}")
        return self._hf_class().config_class.from_pretrained(root, local_files_only=True)

    def _random(self, path: str, torch_dtype: torch.dtype, attn: str, trust_remote_code: bool):
        from transformers import AutoTokenizer

        self.config._attn_implementation = attn
        hf = self._hf_class()(self.config).to(torch_dtype)
        root = Path(path).expanduser()
        if any((root / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True,
                                                      trust_remote_code=trust_remote_code)
        else:
            from vitavla.tiny_tokenizer import tiny_tokenizer

            tokenizer = tiny_tokenizer()
        return hf, tokenizer, {}

    def _load(self, path: str, torch_dtype: torch.dtype, attn: str, trust_remote_code: bool):
        from transformers import AutoTokenizer

        root = Path(path).expanduser()
        hf = self._hf_class().from_pretrained(root, dtype=torch_dtype, attn_implementation=attn,
                                              local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True,
                                                  trust_remote_code=trust_remote_code)
        stats = {}
        pre = root / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            stats = {k: tuple(cfg[k]) for k in ("image_mean", "image_std") if cfg.get(k) is not None}
        return hf, tokenizer, stats

    def _check_tokens(self, tokens: int) -> int:
        side = math.isqrt(max(tokens, 0))
        if tokens < 1 or side * side != tokens:
            raise ValueError(f"tokens_per_image={tokens} must be a perfect square (e.g. 49 = 7x7)")
        native = self.native_side
        if side > native:
            raise ValueError(
                f"tokens_per_image={tokens} ({side}x{side}) is larger than the native token grid "
                f"{native}x{native} = {native * native} of {type(self).__name__} at "
                f"image_size={self.image_size}; pooling only shrinks the grid, so use at most "
                f"{native * native} or a larger image_size")
        return tokens

    # ---- Backbone contract ---------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("tokenize takes a list of strings, got a single str")
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def embed_tokens(self, ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(ids)

    def embed_images(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got shape {tuple(images.shape)}")
        x = normalize_images(images, self.image_mean, self.image_std, self.dtype)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            # Resizing after the per-channel affine normalization equals resizing the raw pixels.
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        out = self.model.get_image_features(pixel_values=x, **self._vision_kwargs())
        # v5 returns BaseModelOutputWithPooling with the projected tokens in .pooler_output (a tensor for
        # InternVL, a per-image list for LLaVA); 4.x returned the tensor itself.
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        if isinstance(feats, (list, tuple)):
            feats = torch.stack(list(feats))
        expected = self.native_side ** 2
        if feats.shape[1] != expected:
            raise RuntimeError(
                f"{type(self).__name__}: the vision tower gave {feats.shape[1]} tokens per image, expected "
                f"{self.native_side}x{self.native_side} = {expected}; check vision_feature_select_strategy "
                f"({self.config.vision_feature_select_strategy!r}) against whether the tower has a CLS token")
        return pool_tokens(feats, self.tokens_per_image, self.pool)

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor,
                past_key_values=None, use_cache: bool = False) -> BackboneOutput:
        batch, length = inputs_embeds.shape[:2]
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask.dim() != 4 or tuple(attention_mask.shape[-2:]) != (length, past + length):
            raise ValueError(f"attention_mask must be (B, 1, {length}, {past + length}) for {length} new and "
                             f"{past} cached tokens, got {tuple(attention_mask.shape)}")
        if tuple(position_ids.shape) != (batch, length):
            raise ValueError(f"position_ids must be ({batch}, {length}), got {tuple(position_ids.shape)}")
        mask = self._additive_mask(attention_mask, inputs_embeds.dtype)
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache()
        decoder = self.model.language_model
        out = decoder(
            inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids, use_cache=use_cache,
            **{_cache_keyword(type(decoder)): past_key_values},
        )
        # The output field was renamed with the argument; a ModelOutput holds only the fields that are set.
        cache = next((out[k] for k in ("cache", "past_key_values") if k in out.keys()), None) if use_cache else None
        return BackboneOutput(hidden=out.last_hidden_state, cache=cache)

    @staticmethod
    def _additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
        # A 4-D mask reaches attention untouched, so it must already be in the activation dtype. Blocked
        # entries use finfo.min rather than -inf: a fully blocked row (padding) then softmaxes to a uniform
        # row instead of NaN, and fp32 finfo.min is clamped so fp16 does not overflow it to -inf.
        neg = torch.finfo(dtype).min
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, neg)
        return mask.to(dtype).clamp(min=neg)

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.config.text_config)

    def vision_modules(self) -> list[nn.Module]:
        return [self.model.vision_tower, self.model.multi_modal_projector]

    def language_model(self) -> nn.Module:
        return self.model.language_model

    def num_parameters(self, trainable_only: bool = False) -> dict[str, int]:
        """Parameter counts per part (the dropped lm_head is not counted)."""
        def count(module: nn.Module) -> int:
            return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

        parts = {
            "vision_tower": count(self.model.vision_tower),
            "projector": count(self.model.multi_modal_projector),
            "language_model": count(self.model.language_model),
        }
        parts["total"] = sum(parts.values())
        return parts


class LlavaBackbone(HFVLMBackbone):
    """Any ``LlavaForConditionalGeneration``: a CLIP/SigLIP-style tower, Linear-GELU-Linear, any decoder LLM.

    ``path="tiny"`` builds a seeded SigLIP(patch 16) + Qwen2 toy (14x14 = 196 tokens at 224, pooled to
    ``tokens_per_image``). Otherwise ``path`` is a local "-hf" LLaVA directory.
    """

    family = "llava"
    model_type = "llava"


    def _tiny_config(self):
        return tiny_llava_config()

    def _build_tiny(self) -> nn.Module:
        return tiny_llava()

    def _hf_class(self):
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    def _model_type_hint(self) -> str:
        return ("Use a LLaVA '-hf' checkpoint (e.g. llava-hf/llava-1.5-7b-hf), downloaded to a local "
                "directory.")

    def _native_side(self, image_size: int) -> int:
        vision = self.config.vision_config
        patch = square_side(vision.patch_size)
        if image_size % patch:
            raise ValueError(f"image_size={image_size} is not divisible by the vision patch size {patch} "
                             f"({vision.model_type})")
        strategy = self.config.vision_feature_select_strategy
        if strategy == "default" and vision.model_type in _NO_CLS_TOWERS:
            raise ValueError(f"vision_feature_select_strategy='default' drops a CLS token, but "
                             f"{vision.model_type} has none; the checkpoint config should say 'full'")
        return image_size // patch

    def _vision_kwargs(self) -> dict:
        # CLIP/SigLIP keep a fixed position table for their trained resolution; other sizes need
        # interpolation, which they only do on request (and not every tower accepts the flag, so pass it
        # only when needed).
        if self.image_size != square_side(self.config.vision_config.image_size):
            return {"interpolate_pos_encoding": True}
        return {}
