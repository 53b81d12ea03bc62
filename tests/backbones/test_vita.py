"""VITABackbone on a tiny checkpoint written in VITA-1.5's own on-disk layout.

The checkpoint is built here the way VITA's training script saves a ``VITAQwen2ForCausalLM``: sharded
safetensors + ``model.safetensors.index.json``, a ``config.json`` with ``model_type: vita-Qwen2`` and VITA's
``mm_*`` fields, Qwen2 tokenizer files (``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json``), the
audio encoder's tensors and an ``lm_head``, and an ``InternViT-300M-448px/`` directory beside it as in the hub
repository. The references below re-implement VITA's forward semantics in plain torch (fused qkv,
``ls1``/``ls2``, features x 0.5 before the pixel shuffle, Linear-GELU-Linear) so the mapping is checked
against the source's behaviour, not against the adapter's own classes.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vitavla.backbones import VITABackbone
from vitavla.backbones.tiny import IMAGENET_MEAN, IMAGENET_STD
from vitavla.backbones.vita import VITACheckpointError

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              image_size=56, patch_size=14, layer_norm_eps=1e-6)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=320, rms_norm_eps=1e-6, rope_theta=1_000_000.0)
VP, PP = "model.vision_tower.vision_tower.", "model.mm_projector."
MERGES = [("p", "i"), ("c", "k"), ("pi", "ck"), ("Ġ", "u"), ("Ġu", "p"), ("Ġ", "t"), ("h", "e"),
          ("Ġt", "he")]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def vita_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """VITAQwen2ForCausalLM's tensor names and shapes at tiny size, random values (bf16, as released)."""
    g = torch.Generator().manual_seed(seed)
    c, f, p = VISION["hidden_size"], VISION["intermediate_size"], VISION["patch_size"]
    h, i, v = TEXT["hidden_size"], TEXT["intermediate_size"], TEXT["vocab_size"]
    kv = h // TEXT["num_attention_heads"] * TEXT["num_key_value_heads"]
    positions = (VISION["image_size"] // p) ** 2 + 1
    shapes = {VP + "embeddings.class_embedding": (1, 1, c),
              VP + "embeddings.patch_embedding.weight": (c, 3, p, p),
              VP + "embeddings.patch_embedding.bias": (c,),
              VP + "embeddings.position_embedding": (1, positions, c)}
    for n in range(VISION["num_hidden_layers"]):
        base = f"{VP}encoder.layers.{n}."
        shapes.update({base + "attn.qkv.weight": (3 * c, c), base + "attn.qkv.bias": (3 * c,),
                       base + "attn.proj.weight": (c, c), base + "attn.proj.bias": (c,),
                       base + "mlp.fc1.weight": (f, c), base + "mlp.fc1.bias": (f,),
                       base + "mlp.fc2.weight": (c, f), base + "mlp.fc2.bias": (c,),
                       base + "norm1.weight": (c,), base + "norm1.bias": (c,), base + "norm2.weight": (c,),
                       base + "norm2.bias": (c,), base + "ls1": (c,), base + "ls2": (c,)})
    shapes.update({PP + "0.weight": (h, 4 * c), PP + "0.bias": (h,),  # mlp2x_gelu: Linear, GELU, Linear
                   PP + "2.weight": (h, h), PP + "2.bias": (h,)})
    shapes.update({"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)})
    for n in range(TEXT["num_hidden_layers"]):
        base = f"model.layers.{n}."
        shapes.update({base + "self_attn.q_proj.weight": (h, h), base + "self_attn.q_proj.bias": (h,),
                       base + "self_attn.k_proj.weight": (kv, h), base + "self_attn.k_proj.bias": (kv,),
                       base + "self_attn.v_proj.weight": (kv, h), base + "self_attn.v_proj.bias": (kv,),
                       base + "self_attn.o_proj.weight": (h, h), base + "mlp.gate_proj.weight": (i, h),
                       base + "mlp.up_proj.weight": (i, h), base + "mlp.down_proj.weight": (h, i),
                       base + "input_layernorm.weight": (h,), base + "post_attention_layernorm.weight": (h,)})
    # A few of the Whale audio encoder's tensors: the student never loads them.
    shapes.update({"model.audio_encoder.encoder.enc.0.core.conv.0.weight": (16, 1, 3, 3),
                   "model.audio_encoder.encoder.enc.1.encoders.0.self_attn.linear_q.weight": (16, 16),
                   "model.audio_encoder.adpter.project.weight": (h, 32),
                   "model.audio_encoder.adpter.project.bias": (h,)})
    out = {}
    for k, shape in shapes.items():
        # ~unit-variance activations, so float32 comparisons are not dominated by a few huge values
        t = torch.randn(shape, generator=g) * (shape[-1] ** -0.5 if len(shape) > 1 else 0.1)
        if k.endswith(("norm1.weight", "norm2.weight", "layernorm.weight", "norm.weight")):
            t = 1 + 0.1 * t
        out[k] = t.to(torch.bfloat16)
    return out


def write_vita_checkpoint(root: Path, tensors: dict | None = None, shards: int = 3,
                          vision_dir: bool = True) -> Path:
    """``root/VITA1.5_ckpt`` (+ ``root/InternViT-300M-448px``) in the layout VITA's code saves."""
    tensors = vita_state_dict() if tensors is None else tensors
    ckpt = root / "VITA1.5_ckpt"
    ckpt.mkdir(parents=True)
    keys = list(tensors)
    chunk = math.ceil(len(keys) / shards)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[s * chunk:(s + 1) * chunk]}
        save_file(part, str(ckpt / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {
        # The training run's own paths stay in the saved config; they do not exist on the user's machine.
        "_name_or_path": "/path/to/outputs/vita_video_audio", "architectures": ["VITAQwen2ForCausalLM"],
        "model_type": "vita-Qwen2", "attention_dropout": 0.0, "bos_token_id": 256, "eos_token_id": 258,
        "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 1024,
        "max_window_layers": 2, "sliding_window": 131072, "use_sliding_window": False,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.45.0",
        "use_cache": True, **TEXT,
        "mm_vision_tower": "/path/to/model_weights/InternViT-300M-448px", "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": 4 * VISION["hidden_size"], "use_mm_proj": True, "use_s2": False,
        "mm_audio_encoder": "/path/to/model_weights/audio-encoder-Qwen2-7B-1107-weight-base-11wh-tunning",
        "freeze_audio_encoder": True, "freeze_audio_encoder_adapter": True, "audio_prompt_finetune": False,
        "audio_prompt_num": 0, "image_aspect_ratio": "square", "tokenizer_model_max_length": 4600,
        "tokenizer_padding_side": "right", "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False,
        "mm_projector_lr": None, "unfreeze_vision_tower": False,
    }
    (ckpt / "config.json").write_text(json.dumps(config, indent=2))
    write_qwen2_tokenizer(ckpt)
    if vision_dir:
        tower = root / "InternViT-300M-448px"
        tower.mkdir()
        (tower / "config.json").write_text(json.dumps({
            "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
            "auto_map": {"AutoConfig": "configuration_intern_vit.InternVisionConfig"}, "qkv_bias": True,
            "qk_normalization": False, "norm_type": "layer_norm", "hidden_act": "gelu", "num_channels": 3,
            "drop_path_rate": 0.1, "use_flash_attn": True, **VISION}, indent=2))
        (tower / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "CLIPImageProcessor", "crop_size": 448, "do_normalize": True,
            "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD), "size": 448}))
    return ckpt


def write_qwen2_tokenizer(directory: Path) -> None:
    """A byte-level BPE in Qwen2's file format: 256 byte symbols, a few merges, Qwen's special tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: n for n, ch in enumerate(bytes_to_unicode().values())}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    added = {str(len(vocab) + n): {"content": s, "special": True, "lstrip": False, "rstrip": False,
                                   "normalized": False, "single_word": False} for n, s in enumerate(SPECIAL)}
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "bos_token": None, "model_max_length": 4600, "errors": "replace"}))
    added_ids = {s: len(vocab) + n for n, s in enumerate(SPECIAL)}
    (directory / "added_tokens.json").write_text(json.dumps(added_ids))


# ---- references: VITA's forward, from its semantics --------------------------------------------------------
def reference_image_tokens(sd: dict, pixels: torch.Tensor) -> torch.Tensor:
    """InternViT -> drop CLS -> x0.5 -> VITA's pixel shuffle -> mlp2x_gelu, on normalized pixels."""
    w = {k: v.float() for k, v in sd.items()}
    c, heads, patch = VISION["hidden_size"], VISION["num_attention_heads"], VISION["patch_size"]
    x = F.conv2d(pixels, w[VP + "embeddings.patch_embedding.weight"],
                 w[VP + "embeddings.patch_embedding.bias"], stride=patch)
    b, _, gh, gw = x.shape
    x = torch.cat([w[VP + "embeddings.class_embedding"].expand(b, 1, c), x.flatten(2).transpose(1, 2)], 1)
    pos = w[VP + "embeddings.position_embedding"]
    side = VISION["image_size"] // patch
    grid = F.interpolate(pos[:, 1:].reshape(1, side, side, c).permute(0, 3, 1, 2), size=(gh, gw),
                         mode="bicubic", align_corners=False).reshape(1, c, gh * gw).permute(0, 2, 1)
    x = x + torch.cat([pos[:, :1], grid], 1)
    n = x.shape[1]
    for layer in range(VISION["num_hidden_layers"]):
        p = f"{VP}encoder.layers.{layer}."
        y = F.layer_norm(x, (c,), w[p + "norm1.weight"], w[p + "norm1.bias"], VISION["layer_norm_eps"])
        q, k, v = (F.linear(y, w[p + "attn.qkv.weight"], w[p + "attn.qkv.bias"])
                   .reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0))
        att = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, n, c)
        x = x + F.linear(y, w[p + "attn.proj.weight"], w[p + "attn.proj.bias"]) * w[p + "ls1"]
        y = F.layer_norm(x, (c,), w[p + "norm2.weight"], w[p + "norm2.bias"], VISION["layer_norm_eps"])
        y = F.linear(F.gelu(F.linear(y, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"])),
                     w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
        x = x + y * w[p + "ls2"]
    feats = x[:, 1:].reshape(b, gh, gw, c) * 0.5
    nb, ww, hh, cc = feats.shape
    feats = feats.view(nb, ww, hh // 2, cc * 2).permute(0, 2, 1, 3).contiguous()
    feats = feats.view(nb, hh // 2, ww // 2, cc * 4).permute(0, 2, 1, 3).reshape(nb, -1, cc * 4)
    y = F.gelu(F.linear(feats, w[PP + "0.weight"], w[PP + "0.bias"]))
    return F.linear(y, w[PP + "2.weight"], w[PP + "2.bias"])


def reference_llm(sd: dict):
    """transformers' Qwen2Model built directly from the VITA checkpoint's model.* decoder tensors."""
    from transformers import Qwen2Config, Qwen2Model

    model = Qwen2Model(Qwen2Config(**TEXT, tie_word_embeddings=False, max_position_embeddings=1024)).eval()
    llm = {k[len("model."):]: v.float() for k, v in sd.items()
           if k.startswith("model.") and not k.startswith((VP, PP, "model.audio_encoder."))}
    model.load_state_dict(llm, strict=True)
    return model


def causal_mask(batch: int, length: int) -> torch.Tensor:
    allowed = torch.ones(length, length, dtype=torch.bool).tril()
    allowed[3:, 1] = False  # a token later ones cannot see: the 4-D mask must reach attention as given
    return torch.zeros(batch, 1, length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)


@pytest.fixture(scope="module")
def vita_dir(tmp_path_factory) -> Path:
    return write_vita_checkpoint(tmp_path_factory.mktemp("vita"))


def load(path: Path, **kwargs) -> VITABackbone:
    return VITABackbone(path=str(path), tokens_per_image=16, image_size=112, **kwargs)


# ---- tests -------------------------------------------------------------------------------------------------
def test_every_weight_lands_in_place(vita_dir, caplog):
    sd = vita_state_dict()
    with caplog.at_level(logging.INFO, logger="vitavla.backbones.vita"):
        b = load(vita_dir)
    got = {k: v for k, v in b.model.state_dict().items()}
    c = VISION["hidden_size"]
    expect = {  # the target of each VITA tensor, written out independently of the loader's table
        "vision_tower.embeddings.cls_token": sd[VP + "embeddings.class_embedding"],
        "vision_tower.embeddings.patch_embeddings.projection.weight":
            sd[VP + "embeddings.patch_embedding.weight"],
        "vision_tower.embeddings.patch_embeddings.projection.bias":
            sd[VP + "embeddings.patch_embedding.bias"],
        "vision_tower.embeddings.position_embeddings": sd[VP + "embeddings.position_embedding"],
        "multi_modal_projector.linear_1.weight": sd[PP + "0.weight"].float() * 0.5,
        "multi_modal_projector.linear_1.bias": sd[PP + "0.bias"],
        "multi_modal_projector.linear_2.weight": sd[PP + "2.weight"],
        "multi_modal_projector.linear_2.bias": sd[PP + "2.bias"],
    }
    for n in range(VISION["num_hidden_layers"]):
        src, dst = f"{VP}encoder.layers.{n}.", f"vision_tower.encoder.layer.{n}."
        for kind in ("weight", "bias"):
            fused = sd[f"{src}attn.qkv.{kind}"]
            for j, name in enumerate("qkv"):
                expect[f"{dst}attention.{name}_proj.{kind}"] = fused[j * c:(j + 1) * c]
            for a, bb in (("attn.proj", "attention.projection_layer"), ("mlp.fc1", "mlp.fc1"),
                          ("mlp.fc2", "mlp.fc2"), ("norm1", "layernorm_before"),
                          ("norm2", "layernorm_after")):
                expect[f"{dst}{bb}.{kind}"] = sd[f"{src}{a}.{kind}"]
        expect[dst + "lambda_1"], expect[dst + "lambda_2"] = sd[src + "ls1"], sd[src + "ls2"]
    for k, v in sd.items():
        if k.startswith("model.") and not k.startswith((VP, PP, "model.audio_encoder.")):
            expect["language_model." + k[len("model."):]] = v
    assert set(expect) == set(got)  # nothing left at its random init, nothing extra (no projector LayerNorm)
    for k, v in expect.items():
        assert torch.equal(got[k], v.float()), k
    assert isinstance(b.model.multi_modal_projector.layer_norm, torch.nn.Identity)
    assert isinstance(b.model.vision_tower.layernorm, torch.nn.Identity)  # InternViT has no final norm
    assert b.config.vision_config.num_attention_heads == 2  # from the InternViT directory beside the ckpt
    said = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(said) == 1 and "ignored 4 audio-encoder tensors" in said[0] and "1 lm_head" in said[0]


def test_forward_equals_vita_reference(vita_dir):
    sd = vita_state_dict()
    b = load(vita_dir)
    assert (b.hidden_size, b.native_side, b.tokens_per_image) == (64, 4, 16)
    assert b.image_mean == IMAGENET_MEAN and b.image_std == IMAGENET_STD
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 112, 112), dtype=torch.uint8)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        ours = b.embed_images(images)
        ref = reference_image_tokens(sd, (images.float() / 255 - mean) / std)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)

        llm = reference_llm(sd)
        ids = torch.tensor(b.tokenize(["pick up the"]) * 2)
        emb = torch.cat([b.embed_tokens(ids), ours], 1)
        torch.testing.assert_close(b.embed_tokens(ids), llm.embed_tokens(ids), atol=0, rtol=0)
        length = emb.shape[1]
        mask, pos = causal_mask(2, length), torch.arange(length).repeat(2, 1)
        out = b(emb, mask, pos).hidden
        want = llm(inputs_embeds=emb, attention_mask=mask, position_ids=pos).last_hidden_state
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    # Pooling to the paper's 49 tokens works on top (7x7 from the 8x8 grid at 224).
    assert VITABackbone(path=str(vita_dir)).embed_images(images).shape == (2, 49, 64)


def test_tokenizer_is_the_checkpoints_qwen2_bpe(vita_dir):
    b = load(vita_dir)
    vocab = json.loads((vita_dir / "vocab.json").read_text())
    assert type(b.tokenizer).__name__ == "Qwen2Tokenizer" and b.tokenizer.is_fast
    assert b.tokenize(["pick up the"]) == [[vocab["pick"], vocab["Ġup"], vocab["Ġthe"]]]
    assert b.tokenizer.convert_tokens_to_ids("<|im_end|>") == len(vocab) + 2


def _broken(tmp_path, edit) -> Path:
    sd = vita_state_dict()
    edit(sd)
    return write_vita_checkpoint(tmp_path, sd)


@pytest.mark.parametrize("edit, expected", [
    (lambda sd: sd.__setitem__(VP + "encoder.layers.0.attn.rel_pos", torch.zeros(4)),
     r"model\.vision_tower\.vision_tower\.encoder\.layers\.0\.attn\.rel_pos \(4,\): no place .*unmapped"),
    (lambda sd: sd.__setitem__("model.mystery.weight", torch.zeros(2, 2)),
     r"model\.mystery\.weight -> language_model\.mystery\.weight: the adapter has no such parameter"),
    (lambda sd: sd.__setitem__(PP + "0.weight", torch.zeros(64, 96)),
     r"model\.mm_projector\.0\.weight -> multi_modal_projector\.linear_1\.weight: "
     r"expected shape \(64, 128\), found \(64, 96\)"),
    (lambda sd: sd.__setitem__(VP + "encoder.layers.1.attn.qkv.weight", torch.zeros(96, 16)),
     r"encoder\.layers\.1\.attn\.qkv\.weight -> vision_tower\.encoder\.layer\.1\.attention\.q_proj\.weight: "
     r"expected shape \(96, 32\), found \(96, 16\)"),
    (lambda sd: sd.pop("model.norm.weight"),
     r"language_model\.norm\.weight: no tensor in the checkpoint fills it \(missing key\)"),
])
def test_unmapped_mismatched_or_missing_keys_fail_clearly(tmp_path, edit, expected):
    ckpt = _broken(tmp_path, edit)
    with pytest.raises(VITACheckpointError, match=expected) as err:
        load(ckpt)
    assert "nothing was loaded" in str(err.value) and "1 problem(s)" in str(err.value)


def test_checkpoint_files_are_checked(tmp_path):
    ckpt = write_vita_checkpoint(tmp_path)
    (ckpt / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(VITACheckpointError, match=r"names shards that are not in .*model-00002-of-00003"):
        load(ckpt)
    (ckpt / "model.safetensors.index.json").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(VITACheckpointError, match=r"pickles, which vitavla never loads"):
        load(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2"}))
    with pytest.raises(ValueError, match="expected 'vita-Qwen2'"):
        load(ckpt)
    (ckpt / "config.json").write_text(json.dumps({**cfg, "mm_projector_type": "ldp"}))
    with pytest.raises(VITACheckpointError, match="only VITA-1.5's 'mlp2x_gelu'"):
        load(ckpt)
    with pytest.raises(ValueError, match="trust_remote_code must be false"):
        VITABackbone(path=str(ckpt), trust_remote_code=True)


def test_vision_config_sources(tmp_path):
    # No InternViT directory: InternViT-300M-448px's published config, so the tiny tower's shapes disagree
    # and the loader says so instead of loading part of it.
    bare = write_vita_checkpoint(tmp_path / "a", vision_dir=False)
    with pytest.raises(VITACheckpointError, match=r"mm_hidden_size=128 does not equal the InternViT width "
                                                  r"1024 x 4 .* of InternViT-300M-448px's defaults"):
        load(bare)
    cfg = json.loads((bare / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "mm_hidden_size"}))
    with pytest.raises(VITACheckpointError, match=r"patch_embedding\.weight -> .*expected shape "
                                                  r"\(1024, 3, 14, 14\), found \(32, 3, 14, 14\)"):
        load(bare)  # checked on the meta device: the real-width tower is never allocated
    # An explicit vision_config (directory or config.json) wins, and its preprocessor statistics are used.
    other = write_vita_checkpoint(tmp_path / "b").parent / "InternViT-300M-448px"
    pre = json.loads((other / "preprocessor_config.json").read_text())
    (other / "preprocessor_config.json").write_text(json.dumps({**pre, "image_mean": [0.3, 0.3, 0.3]}))
    b = load(bare, vision_config=str(other / "config.json"))
    assert b.config.vision_config.hidden_size == 32 and b.image_mean == (0.3, 0.3, 0.3)
    with pytest.raises(FileNotFoundError, match="no InternViT config.json"):
        load(bare, vision_config=str(tmp_path))


def test_exported_config_rebuilds_the_same_backbone(vita_dir, tmp_path):
    """export writes backbone.config + tokenizer and serve rebuilds with init='random': same model."""
    b = load(vita_dir)
    b.config.save_pretrained(tmp_path)
    b.tokenizer.save_pretrained(tmp_path)
    again = load(tmp_path, init="random")
    again.model.load_state_dict(b.model.state_dict(), strict=True)
    images = torch.randint(0, 256, (1, 3, 112, 112), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(again.embed_images(images), b.embed_images(images))
    assert again.tokenize(["pick up the"]) == b.tokenize(["pick up the"])
    with pytest.raises(ValueError, match="already converted InternVL config"):
        load(tmp_path)


def test_paper_size_config_only_on_meta(tmp_path):
    """VITA-1.5's shapes from config.json alone (what `vitavla plan` does): InternViT-300M without a final
    norm, mlp2x_gelu without a LayerNorm, Qwen2.5-7B."""
    cfg = {"model_type": "vita-Qwen2", "architectures": ["VITAQwen2ForCausalLM"], "hidden_size": 3584,
           "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "vocab_size": 151665, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
           "max_position_embeddings": 32768, "hidden_act": "silu", "mm_projector_type": "mlp2x_gelu",
           "mm_hidden_size": 4096, "mm_vision_tower": "InternViT-300M-448px", "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with torch.device("meta"):
        b = VITABackbone(path=str(tmp_path), init="random", dtype="bfloat16")
    counts = b.num_parameters()
    assert counts["vision_tower"] == 304_012_288  # InternViT-300M-448px
    assert counts["projector"] == 4096 * 3584 + 3584 + 3584 * 3584 + 3584
    assert counts["language_model"] == 7_070_619_136 - (152064 - 151665) * 3584
    assert b.native_side == 8 and b.config.vision_config.num_attention_heads == 16


def test_tiny_and_jsonargparse():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(VITABackbone, "backbone")
    built = parser.instantiate(parser.parse_args(["--backbone.tokens_per_image=16"])).backbone
    assert built.tokens_per_image == 16 and isinstance(built.model.multi_modal_projector.layer_norm,
                                                       torch.nn.Identity)
    assert built.embed_images(torch.zeros(1, 3, 224, 224, dtype=torch.uint8)).shape == (1, 16, 64)


# ---- configs ---------------------------------------------------------------------------------------------------
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("stage", ["align", "finetune"])
def test_vita_configs_parse_and_match_the_calvin_configs(stage, tmp_path):
    import yaml

    from cli import build_cli

    name = f"{stage}_calvin_vita.yaml"
    with pytest.raises(SystemExit) as e:
        build_cli(["fit", "--config", str(CONFIGS / name), "--print_config"], run=True)
    assert e.value.code in (0, None)
    vita, base = (yaml.safe_load((CONFIGS / n).read_text()) for n in (name, f"{stage}_calvin.yaml"))
    backbone = vita["model"]["init_args"]["student"]["init_args"].pop("backbone")
    base_backbone = base["model"]["init_args"]["student"]["init_args"].pop("backbone")
    assert backbone["class_path"] == "vitavla.backbones.VITABackbone"
    assert backbone["init_args"].pop("path") == "checkpoints/VITA-1.5/VITA1.5_ckpt"
    base_backbone["init_args"].pop("path")
    assert backbone["init_args"] == base_backbone["init_args"]  # same tokens, image size, dtype
    # Everything but the student's backbone and the run directories is the paper config it stands beside.
    text = yaml.safe_dump(vita).replace(f"runs/{stage}_calvin_vita", f"runs/{stage}_calvin")
    assert yaml.safe_load(text.replace("runs/align_calvin_vita/", "runs/align_calvin/")) == base
    # The backbone node builds (a tiny checkpoint in VITA's layout standing in for the 16 GB one).
    ckpt = write_vita_checkpoint(tmp_path)
    b = VITABackbone(**{**backbone["init_args"], "path": str(ckpt)})
    assert (b.tokens_per_image, b.image_size, b.dtype) == (49, 224, torch.bfloat16)
