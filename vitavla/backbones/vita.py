"""``VITABackbone``: the paper's own student, VITA-1.5, read from its released checkpoint without VITA's code.

VITA-1.5 (``VITA-MLLM/VITA-1.5``, folder ``VITA1.5_ckpt``) is a ``VITAQwen2ForCausalLM``:
InternViT-300M-448px, a two-layer MLP projector and Qwen2.5-7B, plus an audio encoder the student does not
use. Its ``config.json`` (``model_type: vita-Qwen2``) names classes that only exist in VITA's repository, so
``transformers`` cannot load it. The architecture is InternVL's, though, and this module maps the checkpoint
onto the stock ``InternVLForConditionalGeneration`` behind :class:`InternVLBackbone`, reading the safetensors
shards, the index and the JSON configs itself (no remote code, no pickles).

What VITA's code does, and how it maps (the stock InternVL path differs in three places):

* Vision tower ``model.vision_tower.vision_tower.*`` (InternViT): a fused ``attn.qkv`` whose output rows are
  [q; k; v] (reshaped as ``(3, heads, head_dim)``) is split into ``q_proj``/``k_proj``/``v_proj``; the
  per-layer scales ``ls1``/``ls2`` are ``lambda_1``/``lambda_2``; ``norm1``/``norm2`` are the
  pre-attention and pre-MLP norms. InternViT has no final norm (features are the last encoder layer's
  output), so the tower is built with ``use_mean_pooling=True``, which makes the stock final norm an identity.
* Connector: CLS dropped, the 2x2 pixel shuffle InternVL uses (downsample ratio 0.5, 1024 -> 4096 channels),
  but VITA multiplies the features by 0.5 before it and has no LayerNorm in front of the MLP
  (``mm_projector_type: mlp2x_gelu`` = Linear, GELU, Linear). So the projector's LayerNorm is replaced by
  an identity and the 0.5 is folded into ``linear_1.weight`` (exact: a power of two).
* LLM ``model.embed_tokens``/``model.layers.N``/``model.norm`` are stock Qwen2 keys; ``lm_head`` is not
  needed (the student reads hidden states) and ``model.audio_encoder.*`` is skipped; both are counted in
  one log line.

Every checkpoint tensor must land on exactly one adapter parameter with the expected shape, and every adapter
parameter must be filled: anything else is one :class:`VITACheckpointError` naming the keys and shapes.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from vitavla.backbones.internvl import InternVLBackbone
from vitavla.backbones.tiny import tiny_internvl, tiny_internvl_config

__all__ = ["VITABackbone", "VITACheckpointError", "load_vita_weights", "map_vita_key", "plan_vita_weights",
           "vita_internvl_config"]

log = logging.getLogger(__name__)

VITA_MODEL_TYPE = "vita-Qwen2"
VISION_PREFIX = "model.vision_tower.vision_tower."
PROJECTOR_PREFIX = "model.mm_projector."
AUDIO_PREFIX = "model.audio_encoder."
LM_HEAD = "lm_head.weight"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# VITA's InternViT tower hard-codes this: it is both the pixel-shuffle ratio and a multiplier on the features.
PIXEL_SHUFFLE_SCALE = 0.5
# OpenGVLab/InternViT-300M-448px's config.json: the only tower VITA-1.5 ships. Used when its directory is not
# found; shapes are checked against the checkpoint either way, only the head count is not visible in them.
INTERNVIT_300M = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "image_size": 448, "patch_size": 14, "qkv_bias": True, "qk_normalization": False,
    "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "hidden_act": "gelu", "num_channels": 3,
}
# The Qwen2 fields of a VITAQwen2Config (a Qwen2Config subclass); the rest of config.json is VITA's training
# bookkeeping (mm_*, freeze_*, tokenizer_*, ...).
_QWEN2_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "use_sliding_window", "sliding_window",
    "max_window_layers", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id",
)


class VITACheckpointError(ValueError):
    """A VITA checkpoint that does not map completely and exactly onto the InternVL adapter."""


# ---- configs -----------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise VITACheckpointError(f"{path} is not valid JSON: {err}") from err


def find_vision_dir(root: Path, vita_config: dict, explicit: str | None = None) -> Path | None:
    """The InternViT directory (holding its ``config.json``) for a VITA checkpoint, or None.

    ``explicit`` (a directory or its config.json) wins. Otherwise ``mm_vision_tower`` from config.json is
    tried as written, relative to the checkpoint, and by its last component next to the checkpoint (the hub
    repository keeps ``InternViT-300M-448px/`` beside ``VITA1.5_ckpt/``; the saved value is a training path).
    """
    if explicit is not None:
        p = Path(explicit).expanduser()
        p = p.parent if p.name == "config.json" else p
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"vision_config={explicit!r}: no InternViT config.json there")
        return p
    tower = vita_config.get("mm_vision_tower")
    if not tower:
        return None
    name = Path(str(tower)).expanduser()
    for cand in (name, root / name, root.parent / name.name, root / name.name):
        if (cand / "config.json").is_file():
            return cand
    return None


def _vision_fields(vision_dir: Path | None) -> dict:
    fields = dict(INTERNVIT_300M)
    if vision_dir is None:
        return fields
    cfg = _read_json(vision_dir / "config.json")
    # A full InternVL chat config nests the tower; InternViT-300M-448px's own config is flat.
    cfg = cfg.get("vision_config", cfg)
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                           "image_size") if k not in cfg]
    if missing:
        raise VITACheckpointError(f"{vision_dir}/config.json is not an InternViT config (no {missing})")
    fields.update({k: cfg[k] for k in fields if k in cfg})
    return fields


def vita_internvl_config(vita_config: dict, vision_dir: Path | None = None):
    """The stock ``InternVLConfig`` equivalent of a VITA-1.5 ``config.json`` (+ the InternViT one)."""
    from transformers import InternVLConfig, Qwen2Config
    from transformers.models.internvl import InternVLVisionConfig

    projector = vita_config.get("mm_projector_type", "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        raise VITACheckpointError(f"mm_projector_type={projector!r}: only VITA-1.5's 'mlp2x_gelu' "
                                  f"(Linear-GELU-Linear) maps onto the InternVL projector")
    v = _vision_fields(vision_dir)
    factor = round(1 / PIXEL_SHUFFLE_SCALE)
    mm_hidden = vita_config.get("mm_hidden_size")
    if mm_hidden is not None and mm_hidden != v["hidden_size"] * factor ** 2:
        source = f"{vision_dir}/config.json" if vision_dir else "InternViT-300M-448px's defaults"
        raise VITACheckpointError(f"mm_hidden_size={mm_hidden} does not equal the InternViT width "
                                  f"{v['hidden_size']} x {factor ** 2} (2x2 pixel shuffle) of {source}; pass "
                                  f"vision_config=<the checkpoint's InternViT directory>")
    vision = InternVLVisionConfig(
        hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
        num_hidden_layers=v["num_hidden_layers"], num_attention_heads=v["num_attention_heads"],
        image_size=v["image_size"], patch_size=v["patch_size"], num_channels=v["num_channels"],
        attention_bias=bool(v["qkv_bias"]), use_qk_norm=bool(v["qk_normalization"]),
        norm_type=v["norm_type"], layer_norm_eps=v["layer_norm_eps"], hidden_act=v["hidden_act"],
        use_mean_pooling=True,  # InternViT has no final norm; this makes the stock one an identity
    )
    text = Qwen2Config(**{k: vita_config[k] for k in _QWEN2_KEYS if k in vita_config},
                       tie_word_embeddings=False)
    grid = v["image_size"] // v["patch_size"] // factor
    # VITA splices image features in at IMAGE_TOKEN_INDEX = -200, which has no vocabulary id; the student
    # passes embeddings, so any in-vocabulary id will do for the (unused) placeholder.
    return InternVLConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=text.vocab_size - 1,
        image_seq_length=grid * grid, downsample_ratio=PIXEL_SHUFFLE_SCALE, projector_hidden_act="gelu",
        vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False,
    )


def vita_projector(model: nn.Module) -> nn.Module:
    """Make an ``InternVLModel``'s projector VITA's ``mlp2x_gelu``: no LayerNorm in front of the MLP."""
    model.multi_modal_projector.layer_norm = nn.Identity()
    return model


# ---- key mapping -------------------------------------------------------------------------------------------
Transform = Callable[[Tensor], Tensor]
_VISION_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_VISION_LAYER_PARTS = {
    "attn.proj.weight": "attention.projection_layer.weight",
    "attn.proj.bias": "attention.projection_layer.bias",
    "attn.q_norm.weight": "attention.q_norm.weight", "attn.k_norm.weight": "attention.k_norm.weight",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
    "norm1.weight": "layernorm_before.weight", "norm1.bias": "layernorm_before.bias",
    "norm2.weight": "layernorm_after.weight", "norm2.bias": "layernorm_after.bias",
    "ls1": "lambda_1", "ls2": "lambda_2",
}
_VISION_EMBEDDINGS = {
    "embeddings.class_embedding": "vision_tower.embeddings.cls_token",
    "embeddings.patch_embedding.weight": "vision_tower.embeddings.patch_embeddings.projection.weight",
    "embeddings.patch_embedding.bias": "vision_tower.embeddings.patch_embeddings.projection.bias",
    "embeddings.position_embedding": "vision_tower.embeddings.position_embeddings",
}


def _qkv_part(index: int) -> Transform:
    # InternAttention reshapes qkv(x) to (B, N, 3, heads, head_dim): rows [0:C) are q, [C:2C) k, [2C:3C) v.
    # The loader has checked that the rows are 3 x the target's, so the chunks are equal.
    def part(t: Tensor) -> Tensor:
        return t.chunk(3, dim=0)[index]
    return part


def _identity(t: Tensor) -> Tensor:
    return t


def _scale_by_pixel_shuffle(t: Tensor) -> Tensor:
    return t * PIXEL_SHUFFLE_SCALE


def map_vita_key(key: str) -> list[tuple[str, Transform]] | str | None:
    """Where one VITA-1.5 tensor goes in ``InternVLModel``'s state dict.

    Returns ``[(target_key, transform), ...]`` (several targets for a fused qkv), ``"audio"`` or
    ``"lm_head"`` for the tensors the student skips, or None when the key has no place (an error).
    """
    if key.startswith(AUDIO_PREFIX):
        return "audio"
    if key == LM_HEAD:
        return "lm_head"
    if key.startswith(VISION_PREFIX):
        rest = key[len(VISION_PREFIX):]
        if rest in _VISION_EMBEDDINGS:
            return [(_VISION_EMBEDDINGS[rest], _identity)]
        m = _VISION_LAYER.fullmatch(rest)
        if m is None:
            return None
        base, part = f"vision_tower.encoder.layer.{m.group(1)}.", m.group(2)
        if part in ("attn.qkv.weight", "attn.qkv.bias"):
            kind = part.rsplit(".", 1)[1]
            return [(f"{base}attention.{n}_proj.{kind}", _qkv_part(i)) for i, n in enumerate("qkv")]
        return [(base + _VISION_LAYER_PARTS[part], _identity)] if part in _VISION_LAYER_PARTS else None
    if key.startswith(PROJECTOR_PREFIX):
        # nn.Sequential(Linear, GELU, Linear): indices 0 and 2 hold weights.
        target = {"0.weight": "linear_1.weight", "0.bias": "linear_1.bias",
                  "2.weight": "linear_2.weight", "2.bias": "linear_2.bias"}.get(key[len(PROJECTOR_PREFIX):])
        if target is None:
            return None
        # VITA feeds 0.5 * features to the first Linear; W(0.5 x) + b = (0.5 W) x + b.
        transform = _scale_by_pixel_shuffle if target == "linear_1.weight" else _identity
        return [(f"multi_modal_projector.{target}", transform)]
    if key.startswith("model."):
        # Everything else under model.* is the Qwen2 decoder (embed_tokens, layers.N, norm): stock names.
        return [("language_model." + key[len("model."):], _identity)]
    return None


# ---- reading the checkpoint --------------------------------------------------------------------------------
def weight_files(root: Path) -> dict[str, Path]:
    """tensor name -> safetensors file, from ``model.safetensors.index.json`` (sharded) or one file."""
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise VITACheckpointError(f"{index} has no weight_map")
        files = {k: root / v for k, v in weight_map.items()}
        absent = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if absent:
            raise VITACheckpointError(f"{index} names shards that are not in {root}: {absent}")
        return files
    single = root / SINGLE_FILE
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {k: single for k in f.keys()}
    others = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    hint = f" ({others} are pickles, which vitavla never loads)" if others else ""
    raise VITACheckpointError(f"{root} has neither {INDEX_FILE} nor {SINGLE_FILE}{hint}")


def plan_vita_weights(model: nn.Module, root: Path):
    """Check a VITA-1.5 checkpoint against an ``InternVLModel`` (VITA projector; may be on the meta device)
    from the safetensors headers alone, and say where each tensor goes. Raises one
    :class:`VITACheckpointError` listing every unmapped, mismatched or missing key.

    Returns ``(plan, skipped)``: ``{vita_key: [(target, transform), ...]}`` and counts of skipped tensors.
    """
    from safetensors import safe_open

    files = weight_files(root)
    targets = dict(model.named_parameters())
    plan: dict[str, list[tuple[str, Transform]]] = {}
    skipped = {"audio": 0, "lm_head": 0}
    problems: list[str] = []
    filled: dict[str, str] = {}
    by_file: dict[Path, list[str]] = {}
    for key, file in files.items():
        by_file.setdefault(file, []).append(key)
    shapes: dict[str, tuple[int, ...]] = {}
    for file, keys in by_file.items():
        with safe_open(file, framework="pt") as f:
            present = set(f.keys())
            for key in keys:
                if key not in present:
                    problems.append(f"{key}: the index puts it in {file.name}, which does not hold it")
                    continue
                shapes[key] = tuple(f.get_slice(key).get_shape())
    for key, shape in sorted(shapes.items()):
        where = map_vita_key(key)
        if isinstance(where, str):
            skipped[where] += 1
            continue
        if where is None:
            problems.append(f"{key} {shape}: no place in the InternVL adapter (unmapped key)")
            continue
        absent = [t for t, _ in where if t not in targets]
        if absent:
            problems.append(f"{key} -> {absent[0]}: the adapter has no such parameter (unmapped key)")
            continue
        # A fused qkv feeds len(where) equal targets: it must be their row-wise concatenation.
        first = tuple(targets[where[0][0]].shape)
        want = (first[0] * len(where), *first[1:]) if first else first
        for target, _ in where:
            filled[target] = key  # claimed, so a wrong shape is reported once, not also as missing
        if shape != want:
            problems.append(f"{key} -> {where[0][0]}: expected shape {want}, found {shape}")
            continue
        plan[key] = where
    missing = [t for t in targets if t not in filled]
    problems += [f"{t}: no tensor in the checkpoint fills it (missing key)" for t in missing]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise VITACheckpointError(f"{root} does not map onto the VITA/InternVL adapter ({len(problems)} "
                                  f"problem(s)); nothing was loaded:\n  {shown}{more}")
    return plan, skipped


def load_vita_weights(model: nn.Module, root: Path) -> dict[str, int]:
    """Fill every parameter of an ``InternVLModel`` (VITA projector) from VITA-1.5's shards, or raise
    (:func:`plan_vita_weights`) before any tensor data is read. Returns counts of loaded and skipped
    tensors."""
    from safetensors import safe_open

    plan, skipped = plan_vita_weights(model, root)
    targets = dict(model.named_parameters())
    files = weight_files(root)
    by_file: dict[Path, list[str]] = {}
    for key in plan:
        by_file.setdefault(files[key], []).append(key)
    with torch.no_grad():
        for file, keys in by_file.items():
            with safe_open(file, framework="pt") as f:
                for key in keys:
                    tensor = f.get_tensor(key)
                    for target, transform in plan[key]:
                        targets[target].copy_(transform(tensor))
    counts = {"loaded": len(plan), **skipped}
    log.info("VITA-1.5 checkpoint %s: %d tensors mapped onto the InternVL adapter; ignored %d audio-encoder "
             "tensors (model.audio_encoder.*) and %d lm_head tensor(s) the student does not use",
             root, counts["loaded"], counts["audio"], counts["lm_head"])
    return counts


def load_tokenizer(root: Path):
    """VITA-1.5's Qwen2 tokenizer as transformers' fast (``tokenizers``) class, from local files only.

    ``tokenizer.json`` when present, else ``vocab.json`` + ``merges.txt`` with ``tokenizer_config.json``'s
    added tokens: the files VITA's training script saves next to the weights.
    """
    from transformers import Qwen2TokenizerFast

    if not ((root / "tokenizer.json").is_file() or
            ((root / "vocab.json").is_file() and (root / "merges.txt").is_file())):
        raise FileNotFoundError(f"{root} has no Qwen2 tokenizer files (tokenizer.json, or vocab.json + "
                                f"merges.txt)")
    return Qwen2TokenizerFast.from_pretrained(root, local_files_only=True)


# ---- the backbone ------------------------------------------------------------------------------------------
class VITABackbone(InternVLBackbone):
    """VITA-1.5 (InternViT-300M + mlp2x_gelu + Qwen2.5-7B) from its own checkpoint, on the InternVL adapter.

    ``path`` is the local ``VITA1.5_ckpt`` directory of ``VITA-MLLM/VITA-1.5`` (config.json with
    ``model_type: vita-Qwen2``, ``model-*.safetensors`` + ``model.safetensors.index.json``, Qwen2 tokenizer
    files). The InternViT config and image statistics come from ``vision_config`` or the
    ``InternViT-300M-448px`` directory found from config.json's ``mm_vision_tower`` (see
    :func:`find_vision_dir`), else InternViT-300M-448px's published values. ``path="tiny"`` builds the toy
    InternVL with VITA's projector. A directory holding an already converted InternVL config (an exported
    policy's ``backbone/``) is accepted with ``init="random"``, as export/serve build it.
    """

    family = "vita"
    model_type = VITA_MODEL_TYPE

    def __init__(self, path: str = "tiny", tokens_per_image: int = 49, image_size: int = 224,
                 pool: str = "bilinear", dtype: str = "float32", attn_implementation: str = "sdpa",
                 trust_remote_code: bool = False, image_mean: tuple[float, float, float] | None = None,
                 image_std: tuple[float, float, float] | None = None, gradient_checkpointing: bool = False,
                 init: str = "pretrained", vision_config: str | None = None):
        """
        Args:
            vision_config: the InternViT-300M-448px directory (or its config.json); default: found from
                ``mm_vision_tower`` next to the checkpoint, else InternViT-300M-448px's values.
            Others: as :class:`~vitavla.backbones.llava.HFVLMBackbone` (``trust_remote_code`` must stay off:
                VITA's classes are never imported).
        """
        if trust_remote_code:
            raise ValueError("VITABackbone reads VITA-1.5's weights and configs itself; trust_remote_code "
                             "must be false")
        self._vision_arg = vision_config
        self._vision_dir: Path | None = None
        self._converted = False
        super().__init__(path=path, tokens_per_image=tokens_per_image, image_size=image_size, pool=pool,
                         dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=False,
                         image_mean=image_mean, image_std=image_std,
                         gradient_checkpointing=gradient_checkpointing, init=init)

    def _tiny_config(self):
        return tiny_internvl_config()

    def _build_tiny(self) -> nn.Module:
        hf = tiny_internvl()
        vita_projector(hf.model)
        return hf

    def _model_type_hint(self) -> str:
        return ("VITABackbone reads VITA-1.5's own checkpoint (the VITA1.5_ckpt folder of "
                "VITA-MLLM/VITA-1.5); '-hf' InternVL checkpoints go to InternVLBackbone.")

    def _read_config(self, path: str):
        from transformers import InternVLConfig

        root = Path(path).expanduser()
        if not (root / "config.json").is_file():
            return super()._read_config(path)  # its messages for a missing directory or config.json
        raw = _read_json(root / "config.json")
        if raw.get("model_type") == InternVLConfig.model_type:
            # Written by this class (export): already converted, the projector is rebuilt as VITA's below.
            self._converted = True
            return InternVLConfig.from_pretrained(root, local_files_only=True)
        if raw.get("model_type") != VITA_MODEL_TYPE:
            raise ValueError(f"VITABackbone: {root}/config.json has model_type={raw.get('model_type')!r}, "
                             f"expected {VITA_MODEL_TYPE!r}. {self._model_type_hint()}")
        self._vision_dir = find_vision_dir(root, raw, self._vision_arg)
        if self._vision_dir is None:
            log.info("VITA-1.5 checkpoint %s: no InternViT directory found (mm_vision_tower=%r); using "
                     "InternViT-300M-448px's config, checked against the checkpoint's shapes",
                     root, raw.get("mm_vision_tower"))
        return vita_internvl_config(raw, self._vision_dir)

    def _empty_model(self, torch_dtype: torch.dtype, attn: str, skip_init: bool) -> nn.Module:
        from transformers import InternVLForConditionalGeneration
        from transformers.initialization import no_init_weights

        self.config._attn_implementation = attn
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch_dtype)  # build in the target dtype: no fp32 copy of 8B weights
        try:
            if skip_init:  # every parameter is overwritten by the checkpoint (checked), so skip random init
                with no_init_weights():
                    hf = InternVLForConditionalGeneration(self.config)
            else:
                hf = InternVLForConditionalGeneration(self.config)
        finally:
            torch.set_default_dtype(previous)
        hf.set_attn_implementation(attn)
        vita_projector(hf.model)
        return hf.eval()

    def _tokenizer_or_tiny(self, root: Path):
        try:
            return load_tokenizer(root)
        except FileNotFoundError:
            # config.json alone (parameter accounting): the tokenizer does not change any shape.
            from vitavla.tiny_tokenizer import tiny_tokenizer

            return tiny_tokenizer()

    def _stats(self, root: Path) -> dict:
        for d in (self._vision_dir, root):
            pre = None if d is None else d / "preprocessor_config.json"
            if pre is not None and pre.is_file():
                cfg = _read_json(pre)
                return {k: tuple(cfg[k]) for k in ("image_mean", "image_std") if cfg.get(k) is not None}
        return {}

    def _random(self, path: str, torch_dtype: torch.dtype, attn: str, trust_remote_code: bool):
        root = Path(path).expanduser()
        hf = self._empty_model(torch_dtype, attn, skip_init=False)
        return hf, self._tokenizer_or_tiny(root), self._stats(root)

    def _load(self, path: str, torch_dtype: torch.dtype, attn: str, trust_remote_code: bool):
        root = Path(path).expanduser()
        if self._converted:
            raise ValueError(f"VITABackbone: {root}/config.json is an already converted InternVL config (an "
                             f"exported policy's backbone/): build it with init='random' and load the "
                             f"policy's weights over it, or point path at the VITA1.5_ckpt directory")
        # Check every key and shape on a meta-device model first: a wrong checkpoint fails before 16 GB of
        # weights are allocated or read.
        with torch.device("meta"):
            plan_vita_weights(self._empty_model(torch_dtype, attn, skip_init=True).model, root)
        hf = self._empty_model(torch_dtype, attn, skip_init=True)
        load_vita_weights(hf.model, root)
        return hf, load_tokenizer(root), self._stats(root)
