"""Seer's frozen language encoder: the CLIP ViT-B/32 text tower, with a per-instruction feature cache.

Seer calls OpenAI's ``clip`` package (``clip.load("ViT-B-32.pt")`` + ``encode_text``). We use the equivalent
HF ``CLIPTextModelWithProjection`` from a local directory instead: OpenAI's ``ViT-B-32.pt`` is a TorchScript
archive, which cannot be read with ``torch.load(weights_only=True)``, and we never execute pickled code.
Point ``clip_text`` at an HF-format CLIP directory (``config.json`` + weights + tokenizer files), e.g. a local
copy of ``openai/clip-vit-base-patch32``; its text tower is the same network.

Every step of a Seer window carries the same instruction, and a dataset has few distinct instructions, so
features are computed once per distinct string and reused.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn


class CLIPTextEncoder(nn.Module):
    """Frozen fp32 CLIP text tower: list of N strings -> (N, projection_dim) features (``encode_text``)."""

    def __init__(self, model: nn.Module, tokenizer, cache_size: int = 4096):
        super().__init__()
        self.model = model.float().eval().requires_grad_(False)
        self.tokenizer = tokenizer
        config = model.config
        self.dim = config.projection_dim
        self.max_length = min(config.max_position_embeddings, tokenizer.model_max_length)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Tensor] = OrderedDict()

    @classmethod
    def from_pretrained(cls, path: str | Path, cache_size: int = 4096) -> CLIPTextEncoder:
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"clip_text={str(path)!r} is not an HF-format CLIP directory (no config.json). Seer's OpenAI "
                "ViT-B-32.pt is a TorchScript archive that cannot be loaded safely; use a local copy of "
                "openai/clip-vit-base-patch32 (config.json, model.safetensors, tokenizer files) instead."
            )
        model = CLIPTextModelWithProjection.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return cls(model, tokenizer, cache_size)

    @classmethod
    def tiny(cls, dim: int = 64, seed: int = 0, cache_size: int = 4096) -> CLIPTextEncoder:
        """A small random CLIP text tower on the offline test tokenizer; deterministic for a given seed."""
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        from vitavla.tiny_tokenizer import tiny_tokenizer

        tokenizer = tiny_tokenizer()
        config = CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, projection_dim=dim,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPTextModelWithProjection(config)
        return cls(model, tokenizer, cache_size)

    @classmethod
    def clip_b32_shape(cls, dim: int = 512, seed: int = 0, cache_size: int = 4096) -> CLIPTextEncoder:
        """A random text tower with openai/clip-vit-base-patch32's shape (CLIPTextConfig's defaults: 12 layers,
        width 512, vocabulary 49408) on the offline test tokenizer: for parameter and memory accounting."""
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        from vitavla.tiny_tokenizer import tiny_tokenizer

        tokenizer = tiny_tokenizer()
        config = CLIPTextConfig(projection_dim=dim, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPTextModelWithProjection(config)
        return cls(model, tokenizer, cache_size)

    def train(self, mode: bool = True) -> CLIPTextEncoder:
        # Frozen feature extractor: never switches to training behaviour.
        return super().train(False)

    def clear_cache(self) -> None:
        self._cache.clear()

    def forward(self, texts: list[str]) -> Tensor:
        device = self.model.text_projection.weight.device
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            for text, feature in zip(missing, self.encode_uncached(missing)):
                self._cache[text] = feature
        for text in texts:
            self._cache.move_to_end(text)
        features = torch.stack([self._cache[t].to(device) for t in texts])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return features

    @torch.no_grad()
    def encode_uncached(self, texts: list[str]) -> Tensor:
        ids, attention = self._tokenize(texts)
        device = self.model.text_projection.weight.device
        ids, attention = ids.to(device), attention.to(device)
        hidden = self.model.text_model(input_ids=ids, attention_mask=attention).last_hidden_state
        # OpenAI CLIP pools at the end-of-text token, the last real token of each sequence (causal attention
        # means the right padding never reaches it).
        last = attention.sum(dim=1) - 1
        pooled = hidden[torch.arange(hidden.shape[0], device=device), last]
        return self.model.text_projection(pooled).float()

    def _tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        tok = self.tokenizer
        rows = tok(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        eos = tok.eos_token_id
        if eos is not None:
            # Like clip.tokenize(truncate=True): every sequence ends with the end-of-text token, which
            # replaces the last token when the text was cut. Tokenizers without a post-processor (the tiny
            # test one) add none themselves.
            rows = [r if r and r[-1] == eos else (r + [eos] if len(r) < self.max_length else r[:-1] + [eos])
                    for r in rows]
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            attention[i, : len(r)] = 1
        return ids, attention
