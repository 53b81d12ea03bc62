"""InternVL and LLaVA backbone adapters on tiny random models: shapes, loading, masks, positions, KV cache."""

from __future__ import annotations

import json

import pytest
import torch

from vitavla.backbones.internvl import InternVLBackbone
from vitavla.backbones.llava import LlavaBackbone
from vitavla.backbones.tiny import paper_internvl_config, save_tiny_internvl, save_tiny_llava

ADAPTERS = {"internvl": (InternVLBackbone, save_tiny_internvl), "llava": (LlavaBackbone, save_tiny_llava)}
_BUILT: dict = {}


def backbone(name: str, attn: str = "sdpa", **kwargs):
    key = (name, attn, tuple(sorted(kwargs.items())))
    if key not in _BUILT:
        _BUILT[key] = ADAPTERS[name][0](attn_implementation=attn, **kwargs)
    return _BUILT[key]


def allowed_to_additive(allowed: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """bool (B, L, K) 'may attend' -> additive float (B, 1, L, K)."""
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def window_mask(batch: int, length: int, pad: int = 2, hidden_query: int = 5) -> torch.Tensor:
    """Causal mask with the structure the student uses: token ``hidden_query`` is invisible to later tokens,
    and (when batch > 1) sample 1 is left-padded: pad tokens attend only to themselves, nobody sees them."""
    allowed = torch.ones(length, length, dtype=torch.bool).tril().repeat(batch, 1, 1)
    allowed[:, hidden_query + 1:, hidden_query] = False
    if batch > 1 and pad:
        allowed[1, :, :pad] = False
        allowed[1, torch.arange(pad), torch.arange(pad)] = True
    return allowed


def positions(batch: int, length: int, pad: int = 2) -> torch.Tensor:
    pos = torch.arange(length).repeat(batch, 1)
    if batch > 1:
        pos[1] = (pos[1] - pad).clamp(min=0)
    return pos


@pytest.fixture(params=sorted(ADAPTERS))
def name(request):
    return request.param


def test_shapes_and_tokenize(name):
    b = backbone(name)
    assert b.hidden_size == 64 and b.image_size == 224 and b.tokens_per_image == 49
    images = torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8)
    assert b.embed_images(images).shape == (3, 49, 64)
    # Other input sizes are resized on the fly to image_size.
    assert b.embed_images(images[:, :, :200, :180]).shape == (3, 49, 64)
    ids = b.tokenize(["pick up the red block", "open the drawer"])
    assert all(isinstance(i, int) for seq in ids for i in seq)
    assert not {1, 2} & set(ids[0] + ids[1])  # no <s> / </s>
    emb = b.embed_tokens(torch.tensor([ids[0]]))
    assert emb.shape == (1, len(ids[0]), 64)
    length = 7
    mask = allowed_to_additive(torch.ones(length, length, dtype=torch.bool).tril().repeat(2, 1, 1))
    out = b(torch.randn(2, length, 64), mask, positions(2, length, 0))
    assert out.hidden.shape == (2, length, 64) and out.cache is None
    assert b.embed_images(images[:1]).dtype == torch.float32
    with pytest.raises(TypeError, match="single str"):
        b.tokenize("open the drawer")
    with pytest.raises(ValueError, match="attention_mask must be"):
        b(torch.randn(2, length, 64), mask[..., :-1], positions(2, length, 0))


def test_modules_and_counts(name):
    b = backbone(name)
    vision, projector = b.vision_modules()
    assert vision is b.model.vision_tower and projector is b.model.multi_modal_projector
    assert type(b.language_model()).__name__ == "Qwen2Model"
    counts = b.num_parameters()
    assert counts["total"] == sum(p.numel() for p in b.parameters())
    assert not hasattr(b.model, "lm_head")


def test_from_pretrained_round_trip(name, tmp_path):
    cls, save = ADAPTERS[name]
    save(tmp_path / "ckpt")
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= {
        p.name for p in (tmp_path / "ckpt").iterdir()}
    loaded, tiny = cls(path=str(tmp_path / "ckpt")), backbone(name)
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    length = 6
    mask = allowed_to_additive(window_mask(2, length))
    emb = torch.randn(2, length, 64)
    with torch.no_grad():
        assert torch.equal(loaded.embed_images(images), tiny.embed_images(images))
        pos = positions(2, length)
        assert torch.equal(loaded(emb, mask, pos).hidden, tiny(emb, mask, pos).hidden)
    assert loaded.tokenize(["stack the blocks"]) == tiny.tokenize(["stack the blocks"])
    assert loaded.image_mean == tiny.image_mean

    # preprocessor_config.json drives normalization; an explicit argument beats it.
    pre = tmp_path / "ckpt" / "preprocessor_config.json"
    cfg = json.loads(pre.read_text())
    cfg["image_mean"] = [0.1, 0.2, 0.3]
    pre.write_text(json.dumps(cfg))
    assert cls(path=str(tmp_path / "ckpt")).image_mean == (0.1, 0.2, 0.3)
    assert cls(path=str(tmp_path / "ckpt"), image_mean=(0.4, 0.4, 0.4)).image_mean == (0.4, 0.4, 0.4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_incremental_decoding_matches_full_forward(name, attn):
    b = backbone(name, attn)
    l1, l2 = 7, 4
    length = l1 + l2
    torch.manual_seed(0)
    emb, pos = torch.randn(2, length, 64), positions(2, length)
    mask = allowed_to_additive(window_mask(2, length))
    with torch.no_grad():
        full = b(emb, mask, pos).hidden
        first = b(emb[:, :l1], mask[..., :l1, :l1], pos[:, :l1], use_cache=True)
        assert first.cache.get_seq_length() == l1
        second = b(emb[:, l1:], mask[..., l1:, :], pos[:, l1:], past_key_values=first.cache, use_cache=True)
    assert second.cache.get_seq_length() == length
    torch.testing.assert_close(torch.cat([first.hidden, second.hidden], 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cache_crop_then_append_matches_full_forward(name, attn):
    """Streaming: read throw-away tokens (e.g. action queries), crop them with v5's negative count, go on."""
    b = backbone(name, attn)
    l1, extra, l2 = 6, 3, 4
    torch.manual_seed(1)
    emb, pos = torch.randn(2, l1 + l2, 64), positions(2, l1 + l2)
    mask = allowed_to_additive(window_mask(2, l1 + l2))
    with torch.no_grad():
        full = b(emb, mask, pos).hidden
        cache = b(emb[:, :l1], mask[..., :l1, :l1], pos[:, :l1], use_cache=True).cache
        junk_allowed = torch.ones(2, extra, l1 + extra, dtype=torch.bool)
        junk_allowed[1, :, :2] = False  # same padding columns as the real sequence
        junk_pos = pos[:, l1 - 1:l1] + 1 + torch.arange(extra)
        b(torch.randn(2, extra, 64), allowed_to_additive(junk_allowed), junk_pos, past_key_values=cache,
          use_cache=True)
        assert cache.get_seq_length() == l1 + extra
        cache.crop(-extra)
        assert cache.get_seq_length() == l1
        tail = b(emb[:, l1:], mask[..., l1:, :], pos[:, l1:], past_key_values=cache, use_cache=True).hidden
    torch.testing.assert_close(tail, full[:, l1:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_4d_mask_is_honoured(name, attn):
    b = backbone(name, attn)
    length, hidden_query = 8, 3
    torch.manual_seed(2)
    emb, pos = torch.randn(1, length, 64), positions(1, length, 0)
    allowed = window_mask(1, length, hidden_query=hidden_query)
    mask = allowed_to_additive(allowed)
    poked = emb.clone()
    poked[:, hidden_query] += 5.0
    with torch.no_grad():
        base, after = b(emb, mask, pos).hidden, b(poked, mask, pos).hidden
        causal = allowed_to_additive(torch.ones(1, length, length, dtype=torch.bool).tril())
        leak = b(poked, causal, pos).hidden - b(emb, causal, pos).hidden
        # A bool mask (True = attend) is accepted and means the same thing.
        torch.testing.assert_close(b(emb, allowed[:, None], pos).hidden, base, atol=1e-6, rtol=0)
    # Tokens after the hidden one do not see it; tokens before it never could (causal).
    torch.testing.assert_close(after[:, hidden_query + 1:], base[:, hidden_query + 1:], atol=1e-6, rtol=0)
    torch.testing.assert_close(after[:, :hidden_query], base[:, :hidden_query], atol=1e-6, rtol=0)
    # Under a plain causal mask the same poke does reach later tokens, so the test above has teeth.
    assert leak[:, hidden_query + 1:].abs().max() > 1e-3


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_position_ids_drive_rope(name, attn):
    b = backbone(name, attn)
    length = 6
    torch.manual_seed(3)
    emb = torch.randn(1, length, 64)
    mask = allowed_to_additive(torch.ones(1, length, length, dtype=torch.bool).tril())
    pos = positions(1, length, 0)
    gapped = pos.clone()
    gapped[:, 3:] += 10
    with torch.no_grad():
        base = b(emb, mask, pos).hidden
        shifted = b(emb, mask, pos + 100).hidden
        gap = b(emb, mask, gapped).hidden
    # RoPE is relative: a uniform shift leaves attention scores unchanged (up to float error)...
    shift_err = (shifted - base).abs().max()
    assert shift_err < 1e-5
    # ...but a gap changes what tokens after it compute, and nothing before it. Random init keeps attention
    # logits small, so the effect is small in absolute terms but far above float error.
    torch.testing.assert_close(gap[:, :3], base[:, :3], atol=1e-6, rtol=0)
    assert (gap[:, 3:] - base[:, 3:]).abs().max() > max(100 * shift_err, 1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fully_masked_rows_stay_finite(name, attn):
    b = backbone(name, attn)
    allowed = torch.ones(1, 4, 4, dtype=torch.bool).tril()
    allowed[:, 0] = False  # a query that may attend to nothing (e.g. padding)
    with torch.no_grad():
        out = b(torch.randn(1, 4, 64), allowed_to_additive(allowed), positions(1, 4, 0)).hidden
        # -inf from a user mask is clamped to the dtype's minimum instead of producing NaN rows.
        inf_mask = torch.zeros(1, 1, 4, 4).masked_fill(~allowed[:, None], float("-inf"))
        out_inf = b(torch.randn(1, 4, 64), inf_mask, positions(1, 4, 0)).hidden
    assert torch.isfinite(out).all() and torch.isfinite(out_inf).all()


def test_bfloat16_and_gradients(name):
    b = backbone(name, dtype="bfloat16")
    assert b.dtype == torch.bfloat16
    images = torch.randint(0, 256, (1, 3, 224, 224), dtype=torch.uint8)
    tokens = b.embed_images(images)
    assert tokens.dtype == torch.bfloat16
    mask = allowed_to_additive(torch.ones(1, 49, 49, dtype=torch.bool).tril())  # fp32 min, clamped for bf16
    out = b(tokens, mask, positions(1, 49, 0)).hidden
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().pow(2).mean().backward()
    assert b.language_model().layers[0].self_attn.q_proj.weight.grad is not None
    assert next(b.vision_modules()[0].parameters()).grad is not None
    b.zero_grad(set_to_none=True)


def test_gradient_checkpointing_matches(name):
    plain, ckpt = backbone(name), backbone(name, gradient_checkpointing=True)
    ckpt.train()
    length = 5
    emb = torch.randn(2, length, 64, requires_grad=True)
    mask = allowed_to_additive(torch.ones(2, length, length, dtype=torch.bool).tril())
    out = ckpt(emb, mask, positions(2, length, 0)).hidden
    torch.testing.assert_close(out, plain(emb, mask, positions(2, length, 0)).hidden)
    out.sum().backward()
    assert emb.grad is not None and ckpt.language_model().layers[0].mlp.up_proj.weight.grad is not None


def test_bad_image_sizes(tmp_path):
    with pytest.raises(ValueError, match=r"image_size=230 is not divisible by the InternViT patch size 14"):
        InternVLBackbone(image_size=230)
    # Sizes are checked against config.json before any weights are read (here there are none).
    save_tiny_internvl(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"image_size=230 is not divisible"):
        InternVLBackbone(path=str(tmp_path), image_size=230)
    with pytest.raises(ValueError, match=r"patch grid 17x17 .* pixel-shuffle factor 2"):
        InternVLBackbone(image_size=238)
    with pytest.raises(ValueError, match=r"image_size=230 is not divisible by the vision patch size 16"):
        LlavaBackbone(image_size=230)
    # 448 -> 32x32 patches -> 16x16 tokens: fine, and the position table is interpolated.
    big = InternVLBackbone(image_size=448, tokens_per_image=256)
    assert big.embed_images(torch.zeros(1, 3, 448, 448, dtype=torch.uint8)).shape == (1, 256, 64)
    small = LlavaBackbone(image_size=192, tokens_per_image=144)
    assert small.embed_images(torch.zeros(1, 3, 192, 192, dtype=torch.uint8)).shape == (1, 144, 64)


@pytest.mark.parametrize("tokens,match", [(50, "perfect square"), (0, "perfect square"),
                                          (81, r"larger than the native token grid 8x8 = 64")])
def test_bad_tokens_per_image(tokens, match):
    with pytest.raises(ValueError, match=match):
        InternVLBackbone(tokens_per_image=tokens)


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_ckpt"):
        InternVLBackbone(path=str(tmp_path / "no_such_ckpt"))
    with pytest.raises(FileNotFoundError, match="no_such_ckpt"):
        LlavaBackbone(path=str(tmp_path / "no_such_ckpt"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LlavaBackbone(path=str(tmp_path))
    with pytest.raises(ValueError, match="unknown dtype 'float64x'"):
        InternVLBackbone(dtype="float64x")
    with pytest.raises(ValueError, match="flash_attention_2"):
        InternVLBackbone(attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="unknown pool"):
        LlavaBackbone(pool="max")
    save_tiny_llava(tmp_path / "llava")
    with pytest.raises(ValueError, match="model_type='llava'.*needs 'internvl'"):
        InternVLBackbone(path=str(tmp_path / "llava"))


def test_paper_size_parameter_counts():
    from transformers import InternVLForConditionalGeneration

    with torch.device("meta"):
        model = InternVLForConditionalGeneration(paper_internvl_config())

    def count(module):
        return sum(p.numel() for p in module.parameters())

    llm, vision = count(model.model.language_model), count(model.model.vision_tower)
    assert llm == 7_070_619_136  # Qwen2.5-7B without lm_head, embeddings included
    assert vision == 304_014_336  # InternViT-300M-448px
    assert count(model.model.multi_modal_projector) == 27_540_480  # 4096 -> 3584 -> 3584, plus LayerNorm
    assert count(model.lm_head) == 152064 * 3584


def test_llava_with_clip_tower_and_default_stats(tmp_path):
    """A CLIP tower (CLS token dropped by 'default'), no preprocessor_config.json -> CLIP's own statistics."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    from vitavla.backbones.tiny import CLIP_MEAN, tiny_text_config
    from vitavla.tiny_tokenizer import tiny_tokenizer

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=224, patch_size=14)
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=tiny_text_config().to_dict(),
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    b = LlavaBackbone(path=str(tmp_path), tokens_per_image=64)
    assert b.native_side == 16 and b.image_mean == CLIP_MEAN
    assert b.embed_images(torch.zeros(2, 3, 224, 224, dtype=torch.uint8)).shape == (2, 64, 64)


def test_constructor_is_jsonargparse_friendly():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(InternVLBackbone, "backbone")
    cfg = parser.parse_args(["--backbone.tokens_per_image=16", "--backbone.image_mean=[0.1,0.2,0.3]"])
    built = parser.instantiate(cfg).backbone
    assert built.tokens_per_image == 16 and built.image_mean == (0.1, 0.2, 0.3)


def test_kv_cache_uses_the_installed_transformers_argument(name):
    # transformers 5.24 renamed `past_key_values` to `cache` (the old name warns; it goes in 5.40): the backbone
    # passes whichever the installed decoder takes, so streaming neither warns now nor breaks then.
    import logging
    import warnings

    b = backbone(name)
    emb, pos = torch.randn(1, 6, 64), positions(1, 6)
    mask = allowed_to_additive(window_mask(1, 6))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            first = b(emb[:, :4], mask[..., :4, :4], pos[:, :4], use_cache=True)
            second = b(emb[:, 4:], mask[..., 4:, :], pos[:, 4:], past_key_values=first.cache, use_cache=True)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    said = [str(w.message) for w in caught] + [r.getMessage() for r in records]
    assert not [m for m in said if "past_key_values" in m], said
    assert second.cache is first.cache and second.cache.get_seq_length() == 6  # the cache went in, and grew
