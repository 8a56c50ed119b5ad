"""``HookedSSMConfig``: everything needed to build a HookedSSM, independent of any checkpoint format."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

LayerType = Literal["gated_deltanet", "full_attention"]
SUPPORTED_LAYER_TYPES: tuple[str, ...] = ("gated_deltanet", "full_attention")
Execution = Literal["chunked", "recurrent"]


@dataclass
class HookedSSMConfig:
    """Architecture of a hybrid recurrent language model.

    Field names follow TransformerLens where a TransformerLens field exists (``d_model``,
    ``n_layers``, ``d_vocab``, ``n_ctx``, ``d_mlp``, ``device``, ``default_prepend_bos`` ...);
    the recurrent-mixer fields are ours. ``n_heads`` is the number of *value* heads of the
    recurrent mixer: hooks, states and writes are per value head.
    """

    d_model: int
    n_layers: int
    d_vocab: int
    layer_types: list[str]
    # Recurrent mixer (Gated DeltaNet): n_key_heads key/query heads serve n_heads value heads.
    n_heads: int = 0
    n_key_heads: int = 0
    d_k: int = 0
    d_v: int = 0
    conv_kernel: int = 4
    chunk_size: int = 64
    execution: Execution = "chunked"
    # Full softmax attention layers of hybrids.
    n_attn_heads: int = 0
    n_kv_heads: int = 0
    d_head: int = 0
    rotary_dim: int = 0
    rope_theta: float = 10_000.0
    attn_output_gate: bool = True
    # MLP, dense (SwiGLU) or sparse mixture of experts with a gated shared expert.
    d_mlp: int = 0
    act_fn: str = "silu"
    n_experts: int = 0
    n_experts_per_tok: int = 0
    d_expert: int = 0
    d_shared_expert: int = 0
    norm_topk_prob: bool = True
    moe_layers: list[bool] = field(default_factory=list)
    # Norms: Qwen3.5 / Qwen3-Next RMSNorms scale by (1 + w).
    eps: float = 1e-6
    norm_zero_centered: bool = True
    tie_word_embeddings: bool = True
    # Bookkeeping, as in HookedTransformerConfig.
    model_name: str = "custom"
    original_architecture: str = "custom"
    n_ctx: int = 4096
    dtype: torch.dtype = torch.float32
    device: str | None = None
    default_prepend_bos: bool = True
    tokenizer_prepends_bos: bool = False
    default_padding_side: Literal["left", "right"] = "right"
    tokenizer_name: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if len(self.layer_types) != self.n_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries but n_layers is {self.n_layers}.")
        unknown = sorted(set(self.layer_types) - set(SUPPORTED_LAYER_TYPES))
        if unknown:
            raise ValueError(f"Unsupported layer types {unknown}; supported: {list(SUPPORTED_LAYER_TYPES)}.")
        if "gated_deltanet" in self.layer_types and (self.n_key_heads <= 0 or self.n_heads % self.n_key_heads):
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a positive multiple of n_key_heads ({self.n_key_heads})."
            )
        if not self.moe_layers:
            self.moe_layers = [self.n_experts > 0] * self.n_layers
        if self.execution not in ("chunked", "recurrent"):
            raise ValueError(f"execution must be 'chunked' or 'recurrent', not {self.execution!r}.")
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dtype"] = str(self.dtype).removeprefix("torch.")
        return d
