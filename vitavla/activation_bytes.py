"""Bytes autograd keeps from forward to backward in a Qwen2/LLaMA decoder (fused SDPA attention, RMSNorm,
rotary embeddings, grouped-query attention, SwiGLU MLP), per token and per micro-batch, with and without
LoRA adapters and activation checkpointing: the activation column of ``vitavla plan``
(:mod:`vitavla.plan`). The method is Korthikanti et al. 2022, section 4.1, recounted op by op for these
layers; ``tests/vitavla/test_plan.py`` checks it against tensors saved by real CPU training steps."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vitavla.errors import ConfigError

@dataclass
class LLMShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int

    @classmethod
    def of(cls, config) -> LLMShape:
        return cls(int(config.num_hidden_layers), int(config.hidden_size), int(config.num_attention_heads),
                   int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
                   int(config.intermediate_size))

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class LoraActivations:
    """What LoRA adapters change in a block's saved tensors: which projections carry one, their rank, and
    whether adapter dropout is on (read from the built module by :func:`lora_activations`)."""

    targets: frozenset[str]
    rank: int
    dropout: bool


# Where each projection's input comes from: q/k/v share the attention norm's output, gate/up the MLP norm's,
# o reads the attention output (which SDPA keeps anyway) and down the SwiGLU product.
_ATTN_IN, _MLP_IN = {"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}
_PROJECTIONS = _ATTN_IN | _MLP_IN | {"o_proj", "down_proj"}


def lora_activations(llm: nn.Module) -> LoraActivations | None:
    """The LoRA layout of ``llm`` (None without adapters); ConfigError for adapters the plan cannot place."""
    from vitavla.lora import ADAPTER_NAME, KEY, adapted_modules

    layers = adapted_modules(llm)
    if not layers:
        return None
    targets = frozenset(name.rpartition(".")[2] for name in layers)
    if not targets <= _PROJECTIONS:
        raise ConfigError(f"{KEY}.target_modules: the plan models adapters on a Qwen2/LLaMA block's projections "
                          f"{sorted(_PROJECTIONS)}, got {sorted(targets - _PROJECTIONS)}")
    first = next(iter(layers.values()))
    dropout = first.lora_dropout[ADAPTER_NAME]
    return LoraActivations(targets, int(first.r[ADAPTER_NAME]), isinstance(dropout, nn.Dropout) and dropout.p > 0)


def _lora_layer_bytes(shape: LLMShape, e: int, lora: LoraActivations) -> float:
    """Per token, what a block's adapters keep beyond its frozen computation.

    Each adapter keeps its rank-r intermediate (for B's gradient), e*r. Without dropout A reads the
    projection's own input, kept once per shared input; with dropout each adapter keeps its own dropped copy
    and the dropout mask, and the shared inputs are no longer needed. The mask is counted at e bytes a value,
    as CPU dropout keeps it (in the input's dtype); CUDA's fused dropout keeps a 1-byte bool mask, so on a
    GPU this term is up to (e - 1) bytes a value high: the plan errs towards "does not fit".
    """
    h, i = shape.hidden, shape.intermediate
    kept = len(lora.targets) * e * lora.rank
    if lora.dropout:
        return kept + sum(2 * e * (i if t == "down_proj" else h) for t in lora.targets)
    shared_inputs = (e * h * bool(lora.targets & _ATTN_IN) + e * h * bool(lora.targets & _MLP_IN)
                     + e * i * ("down_proj" in lora.targets))
    return kept + shared_inputs


def layer_activation_bytes(shape: LLMShape, e: int, trainable: bool, lora: LoraActivations | None = None
                           ) -> float:
    """Bytes one decoder block keeps for backward, per token, with activations of ``e`` bytes.

    Counted op by op on transformers' Qwen2 block (SDPA; measured with saved-tensor hooks):
      - each RMSNorm upcasts to fp32 and keeps its fp32 input and 1/rms: 4h + 4; with a trainable weight
        also the normalized activation, e*h;
      - attention keeps q, k, v (k and v expanded to all heads: transformers repeats KV heads whenever a
        custom mask is passed) and the output, 4*e*h, plus the fp32 log-sum-exp per head, 4*heads. The fused
        kernels (flash, memory-efficient, CPU flash) keep no (L x L) score matrix;
      - the SwiGLU MLP keeps gate, silu(gate) and up, 3*e*i;
      - with trainable weights, every Linear also keeps its input for the weight gradient: the q/k/v input
        (shared), the MLP input (shared by gate and up) and the down-projection input, e*(2h + i); the
        attention output, which o_proj reads, is already kept by SDPA;
      - with ``lora``, the block's own weights (norms included) are frozen and the adapters keep what
        :func:`_lora_layer_bytes` counts instead of the weight inputs.
    """
    h, i = shape.hidden, shape.intermediate
    if lora is not None:
        return 2 * (4 * h + 4) + 4 * e * h + 4 * shape.heads + 3 * e * i + _lora_layer_bytes(shape, e, lora)
    norms = 2 * (4 * h + 4 + (e * h if trainable else 0))
    attention = 4 * e * h + 4 * shape.heads
    mlp = 3 * e * i
    weight_inputs = e * (2 * h + i) if trainable else 0
    return norms + attention + mlp + weight_inputs


@dataclass
class ActivationEstimate:
    per_layer: float
    """Bytes one block keeps, whole micro-batch."""
    shared: float
    """Kept once per forward: the additive mask, rotary tables and the final norm."""
    checkpoint: float
    """What activation checkpointing keeps per block: its input."""
    layers: int

    @property
    def saved(self) -> float:
        return self.layers * self.per_layer + self.shared

    @property
    def saved_checkpointed(self) -> float:
        return self.layers * self.checkpoint + self.shared

    @property
    def peak_checkpointed(self) -> float:
        # Backward recomputes one block at a time, whose activations then live next to the checkpoints.
        return self.saved_checkpointed + self.per_layer


def llm_activation_bytes(shape: LLMShape, batch: int, seq: int, e: int, trainable: bool,
                         lora: LoraActivations | None = None) -> ActivationEstimate:
    tokens = batch * seq
    # The final norm's weight trains with the LLM, not with LoRA (which leaves every LLM weight frozen).
    norm = 4 * shape.hidden + 4 + (e * shape.hidden if trainable and lora is None else 0)
    shared = batch * seq * seq * e + 2 * tokens * shape.head_dim * e + tokens * norm
    return ActivationEstimate(per_layer=tokens * layer_activation_bytes(shape, e, trainable, lora), shared=shared,
                              checkpoint=tokens * e * shape.hidden, layers=shape.layers)


