"""Tiny random VLMs for tests and the CPU demo, and the paper-size InternVL config for parameter counts.

Everything here is built offline: the tokenizer is ``vitavla.tiny_tokenizer`` and the weights come from a
seeded random init, so two builds with the same seed are bit-identical. ``save_tiny_*`` write the real
Hugging Face directory layout (``config.json``, ``model.safetensors``, tokenizer files and
``preprocessor_config.json``) so tests exercise the same ``from_pretrained`` path as a downloaded checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vitavla.tiny_tokenizer import tiny_tokenizer

TINY_IMAGE_SIZE = 224

# Image statistics in [0, 1] units. InternVL (and VITA-1.5's InternViT) use ImageNet statistics; CLIP has its
# own; SigLIP maps to [-1, 1]. Used when a checkpoint directory ships no preprocessor_config.json.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

_STATS_BY_VISION_TYPE = {
    "internvl_vision": (IMAGENET_MEAN, IMAGENET_STD),
    "clip_vision_model": (CLIP_MEAN, CLIP_STD),
    "siglip_vision_model": (HALF, HALF),
    "siglip2_vision_model": (HALF, HALF),
}


def default_image_stats(vision_model_type: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Family-default (mean, std) for a vision tower's ``model_type``; ImageNet when the family is unknown."""
    return _STATS_BY_VISION_TYPE.get(vision_model_type, (IMAGENET_MEAN, IMAGENET_STD))


def tiny_vocab_size() -> int:
    """The tiny tokenizer's size rounded up to a multiple of 64 (the top id stays free as the image token)."""
    n = len(tiny_tokenizer())
    return (n // 64 + 1) * 64


def tiny_text_config():
    """A 2-layer Qwen2 with grouped-query attention (4 heads, 2 KV heads), like Qwen2.5 but 64 wide."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=tiny_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def tiny_internvl_config():
    """InternViT-style tower (patch 14 at 224 -> 16x16, pixel shuffle -> 8x8 = 64 tokens) + tiny Qwen2."""
    from transformers import InternVLConfig
    from transformers.models.internvl import InternVLVisionConfig

    vision = InternVLVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=TINY_IMAGE_SIZE, patch_size=14, layer_scale_init_value=0.1,
    )
    text = tiny_text_config()
    return InternVLConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=text.vocab_size - 1,
        image_seq_length=64, downsample_ratio=0.5, tie_word_embeddings=False,
    )


def tiny_llava_config():
    """SigLIP-style tower (patch 16 at 224 -> 14x14 = 196 tokens, no CLS) + tiny Qwen2, LLaVA projector."""
    from transformers import LlavaConfig, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=TINY_IMAGE_SIZE, patch_size=16,
    )
    text = tiny_text_config()
    # SigLIP has no CLS token, so "full" keeps every patch; "default" would drop a real patch.
    return LlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=text.vocab_size - 1,
        image_seq_length=196, vision_feature_select_strategy="full", vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def _seeded(build, seed: int):
    # fork_rng keeps the caller's global RNG stream untouched, so building a tiny model inside a test or a
    # LightningModule does not shift the seeds of everything built after it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_internvl(seed: int = 0):
    """A deterministic random ``InternVLForConditionalGeneration`` (float32, eval mode)."""
    from transformers import InternVLForConditionalGeneration

    return _seeded(lambda: InternVLForConditionalGeneration(tiny_internvl_config()), seed).eval()


def tiny_llava(seed: int = 0):
    """A deterministic random ``LlavaForConditionalGeneration`` (float32, eval mode)."""
    from transformers import LlavaForConditionalGeneration

    return _seeded(lambda: LlavaForConditionalGeneration(tiny_llava_config()), seed).eval()


def _save(model, directory: str | Path, processor_type: str) -> Path:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    mean, std = default_image_stats(model.config.vision_config.model_type)
    # Only the fields we read (mean/std), plus enough for a human to recognise the file. We never load an
    # image processor class: several of them pull in torchvision, which is broken on some installs.
    pre = {
        "image_processor_type": processor_type, "image_mean": list(mean), "image_std": list(std),
        "size": {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, "do_normalize": True,
        "do_rescale": True, "rescale_factor": 1 / 255,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    return out


def save_tiny_internvl(directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny InternVL checkpoint directory loadable by ``InternVLBackbone(path=directory)``."""
    return _save(tiny_internvl(seed), directory, "GotOcr2ImageProcessorFast")


def save_tiny_llava(directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny LLaVA (SigLIP + Qwen2) checkpoint loadable by ``LlavaBackbone(path=directory)``."""
    return _save(tiny_llava(seed), directory, "SiglipImageProcessor")


def paper_internvl_config():
    """VITA-1.5's shape as a stock ``InternVLConfig``: InternViT-300M-448px + pixel shuffle + Qwen2.5-7B.

    Build it under ``torch.device("meta")`` to count parameters without allocating 8B weights. The stock
    projector has a LayerNorm that VITA's ``mlp2x_gelu`` lacks (8192 parameters, negligible here).
    """
    from transformers import InternVLConfig, Qwen2Config
    from transformers.models.internvl import InternVLVisionConfig

    vision = InternVLVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=448, patch_size=14, attention_bias=True, use_qk_norm=False, norm_type="layer_norm",
        layer_scale_init_value=0.1, use_mean_pooling=False,
    )
    text = Qwen2Config(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, tie_word_embeddings=False,
        bos_token_id=151643, eos_token_id=151645,
    )
    return InternVLConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=151667,
        image_seq_length=256, downsample_ratio=0.5, projector_hidden_act="gelu", tie_word_embeddings=False,
    )
