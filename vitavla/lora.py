"""LoRA for stage 2: low-rank adapters on the student's language model, through ``peft``, and their merge.

:func:`apply_lora` injects adapters into the LLM *in place* (``peft.inject_adapter_in_model``): the LLM stays
the same ``transformers`` class with the same ``forward``, so the backbone's custom 4-D mask, explicit
positions and KV cache (streaming inference) need no change, and no ``PeftModel`` wrapper renames the whole
module tree. Each adapted ``nn.Linear`` becomes a ``peft`` LoRA layer: its frozen weight moves to
``<name>.base_layer.weight`` and the adapters are ``<name>.lora_A.default.weight`` (rank x in) and
``<name>.lora_B.default.weight`` (out x rank, zero at init, so training starts from the base model).

:func:`merge_lora` folds ``W + (alpha / rank) * B @ A`` into each base weight and puts the plain layer back:
the merged policy has the key layout of a policy built without LoRA, which is what ``vitavla export``
writes and :func:`vitavla.serving.export.load_policy_dir` loads strictly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from vitavla.errors import ConfigError, MissingDependencyError

KEY = "model.init_args.lora"
ADAPTER_NAME = "default"
ADAPTER_MARK = "lora_"
"""Substring of every adapter parameter name (``lora_A``, ``lora_B``), and of no base weight."""
ALL_LINEAR = "all-linear"
QWEN2_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    """LoRA adapters on the student's LLM (stage 2); the LLM's own weights then stay frozen."""

    rank: int = 16
    """Rank r of each adapter (B @ A with A: r x in, B: out x r)."""
    alpha: float = 32.0
    """Scale numerator: the adapter's update is multiplied by alpha / rank."""
    dropout: float = 0.05
    """Dropout on the adapter's input during training, in [0, 1)."""
    target_modules: list[str] = field(default_factory=lambda: list(QWEN2_PROJECTIONS))
    """Linear layers to adapt, by name or name suffix inside the LLM (Qwen2/LLaMA: q_proj k_proj v_proj
    o_proj gate_proj up_proj down_proj), or ["all-linear"] for every Linear layer of the LLM."""

    def __post_init__(self):
        # Checked here, at config time, so a bad value is one line naming the field, not a peft traceback.
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"{KEY}.rank: expected an integer >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ConfigError(f"{KEY}.alpha: expected a number > 0, got {self.alpha!r}")
        if (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
                or not 0 <= self.dropout < 1):
            raise ConfigError(f"{KEY}.dropout: expected a number in [0, 1), got {self.dropout!r}")
        targets = self.target_modules
        if (isinstance(targets, str) or not isinstance(targets, (list, tuple)) or not targets
                or not all(isinstance(t, str) and t for t in targets)):
            raise ConfigError(f"{KEY}.target_modules: expected a non-empty list of module names, got {targets!r}")
        if ALL_LINEAR in targets and len(targets) > 1:
            raise ConfigError(f"{KEY}.target_modules: {ALL_LINEAR!r} already adapts every Linear layer; give "
                              f"it alone, got {list(targets)!r}")
        self.target_modules = list(targets)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def _peft():
    try:
        import peft
    except ImportError as err:
        raise MissingDependencyError(f"{KEY}: LoRA needs the 'peft' package: pip install 'vitavla[lora]' "
                                     f"(or pip install peft)") from err
    return peft


def is_adapter_parameter(name: str) -> bool:
    """Whether the parameter called ``name`` (any prefix) is a LoRA adapter weight."""
    return ADAPTER_MARK in name


def adapted_modules(module: nn.Module) -> dict[str, nn.Module]:
    """The LoRA layers inside ``module`` by name (empty when it has none, or when peft is not installed:
    then nothing can hold adapters)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return {}
    return {n: m for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)}


def _matches(name: str, target: str) -> bool:
    # peft's rule for a list of targets: the full module name, or its suffix after a dot.
    return name == target or name.endswith("." + target)


def resolve_targets(llm: nn.Module, cfg: LoraConfig) -> list[str]:
    """Names of the LLM's modules ``cfg`` adapts; a target that matches no Linear layer is a ConfigError."""
    linear = [n for n, m in llm.named_modules() if isinstance(m, nn.Linear)]
    if cfg.target_modules == [ALL_LINEAR]:
        chosen = linear
    else:
        chosen = [n for n in linear if any(_matches(n, t) for t in cfg.target_modules)]
        leaves = sorted({n.rpartition(".")[2] for n in linear})
        for t in cfg.target_modules:
            if not any(_matches(n, t) for n in linear):
                raise ConfigError(f"{KEY}.target_modules: {t!r} names no Linear layer of the student's language "
                                  f"model ({type(llm).__name__}); its Linear layers are {leaves}")
    if not chosen:
        raise ConfigError(f"{KEY}.target_modules: the student's language model ({type(llm).__name__}) has no "
                          "Linear layer to adapt")
    return chosen


def apply_lora(llm: nn.Module, cfg: LoraConfig) -> list[str]:
    """Inject ``cfg``'s adapters into ``llm`` in place and make them its only trainable parameters.

    Returns the adapted module names. Only ``llm``'s own ``requires_grad`` flags change; the caller decides
    about the rest of the model.
    """
    if adapted_modules(llm):
        raise ValueError(f"{type(llm).__name__} already holds LoRA adapters; apply_lora adds one set only")
    peft = _peft()
    targets = resolve_targets(llm, cfg)
    # Exact module names (not cfg's suffixes) so peft adapts exactly what resolve_targets checked.
    config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                             bias="none", init_lora_weights=True)
    peft.inject_adapter_in_model(config, llm, adapter_name=ADAPTER_NAME)
    for name, p in llm.named_parameters():
        p.requires_grad_(is_adapter_parameter(name))
    return targets


def merge_lora(module: nn.Module, safe: bool = True) -> nn.Module:
    """Fold every LoRA adapter inside ``module`` into its base weight, in place; returns ``module``.

    Takes anything that contains the adapted LLM: a ``VLAPolicy``, a ``VLAStudent``, a ``PolicyModule``.
    Afterwards each adapted layer is the plain layer again (``W + alpha / rank * B @ A``), so
    ``module.state_dict()`` has the key layout of the same model built without LoRA. A module without
    adapters is returned unchanged. ``safe`` computes each merged weight in a copy and refuses non-finite
    results (an adapter that diverged) before anything is overwritten in that layer.
    """
    layers = adapted_modules(module)
    # Outermost first: a LoRA layer's own children (lora_A, base_layer) are never replaced separately.
    for name, layer in layers.items():
        if not hasattr(layer, "base_layer"):
            raise TypeError(f"{name}: {type(layer).__name__} has no base layer to merge into")
        layer.merge(safe_merge=safe)
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.get_base_layer())
    # peft records its config on the model it injected into; with no adapter left it would only mislead.
    for m in module.modules():
        if "peft_config" in vars(m):
            del m.peft_config
    return module
