"""``InternVLBackbone``: VITA-1.5's architecture family on the stock ``InternVLForConditionalGeneration``.

InternViT -> drop CLS -> pixel shuffle (2x2 patches -> 1 token) -> LayerNorm-Linear-GELU-Linear -> Qwen2.
At 224x224 with patch 14 the tower sees 16x16 patches, pixel shuffle makes 8x8 = 64 tokens, and the default
``tokens_per_image=49`` bilinearly pools them to 7x7, as VITA-1.5 pools its "fast" video frames.
"""

from __future__ import annotations

from torch import nn

from vitavla.backbones.llava import HFVLMBackbone, square_side
from vitavla.backbones.tiny import paper_internvl_config, tiny_internvl, tiny_internvl_config

__all__ = ["InternVLBackbone", "paper_internvl_config"]


class InternVLBackbone(HFVLMBackbone):
    """Stock InternVL ("-hf" checkpoints such as OpenGVLab/InternVL3-8B-hf = InternViT-300M + Qwen2.5-7B).

    ``path="tiny"`` builds a seeded toy model (InternViT 32 wide, Qwen2 64 wide, 2 layers each) with the
    offline tiny tokenizer; any other value is a local checkpoint directory. Images are normalized with the
    directory's ``preprocessor_config.json`` mean/std when present, else ImageNet statistics (InternVL's).
    """

    family = "internvl"
    model_type = "internvl"


    def _tiny_config(self):
        return tiny_internvl_config()

    def _build_tiny(self) -> nn.Module:
        return tiny_internvl()

    def _hf_class(self):
        from transformers import InternVLForConditionalGeneration

        return InternVLForConditionalGeneration

    def _model_type_hint(self) -> str:
        return ("Original OpenGVLab checkpoints ('internvl_chat') need trust_remote_code classes we do not "
                "use: take the '-hf' release or convert with transformers' "
                "convert_internvl_weights_to_hf.py.")

    def _native_side(self, image_size: int) -> int:
        vision = self.config.vision_config
        patch = square_side(vision.patch_size)
        if image_size % patch:
            raise ValueError(f"image_size={image_size} is not divisible by the InternViT patch size {patch}")
        grid = image_size // patch
        # downsample_ratio 0.5 merges factor x factor = 2x2 neighbouring patches into one token.
        factor = round(1 / self.config.downsample_ratio)
        if grid % factor:
            raise ValueError(
                f"the patch grid {grid}x{grid} (image_size={image_size} / patch {patch}) is not divisible "
                f"by the pixel-shuffle factor {factor} (downsample_ratio={self.config.downsample_ratio}); "
                f"use an image_size that is a multiple of {patch * factor}")
        return grid // factor
