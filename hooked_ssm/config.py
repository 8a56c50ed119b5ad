"""``HookedSSMConfig``: everything needed to build a HookedSSM, independent of any checkpoint format."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

Execution = Literal["chunked", "recurrent"]


@dataclass
class HookedSSMConfig:
    """Architecture of a hybrid recurrent language model.

    Field names follow TransformerLens where a TransformerLens field exists (``d_model``,
    ``n_layers``, ``d_vocab``, ``n_ctx``, ``d_mlp``, ``device``, ``default_prepend_bos`` ...);
    the recurrent-mixer fields are ours. ``n_heads`` is the number of *value* heads of the
    recurrent mixer: hooks, states and writes are per value head.

    Per family, the shared recurrent fields mean:

    - Gated DeltaNet: ``d_k``/``d_v`` key/value head dims, ``n_key_heads`` key heads.
    - Mamba-2: ``d_k`` = ``d_state`` (N), ``d_v`` = ``headdim`` (P), ``n_key_heads`` = ``n_groups``
      (B and C are shared by ``n_heads // n_groups`` heads, like grouped keys).
    - RWKV-7: ``d_k`` = ``d_v`` = head size, ``n_key_heads`` = ``n_heads``; ``d_mlp`` is the
      channel-mix width; the ``rwkv_*_lora`` fields are the LoRA ranks.
    - Kimi Delta Attention: as Gated DeltaNet, without grouped keys (``n_key_heads`` = ``n_heads``).
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
    # Gated DeltaNet variants: beta = gdn_beta_scale * sigmoid(b) (2.0 lets the erase overshoot,
    # beta in (0, 2): OLMo-Hybrid's allow_neg_eigval); eps of the gated output norm (None: eps).
    gdn_beta_scale: float = 1.0
    gdn_norm_eps: float | None = None
    gdn_gate_act: Literal["silu", "sigmoid"] = "silu"  # the output gate's activation (Qwen4-Exp: either)
    # Kimi Delta Attention: rank of the low-rank forget-gate and output-gate projections (0: full rank);
    # the forget gate's form: None: log a = -exp(A_log) softplus(f), a float L: the bounded
    # log a = L sigmoid(exp(A_log) f) in (L, 0) (BailingHybrid's kda_safe_gate).
    kda_gate_rank: int = 0
    kda_gate_lower_bound: float | None = None
    chunk_size: int = 64
    execution: Execution = "chunked"
    # Mamba-2: conv bias, in/out projection bias, dt clamp, fp32 residual stream.
    conv_bias: bool = False
    proj_bias: bool = False
    time_step_limit: tuple[float, float] = (0.0, float("inf"))
    residual_in_fp32: bool = False
    # Mamba-2's gated norm: "gate_then_norm" (Mamba-2, Bamba, Granite, NemotronH),
    # "norm_then_gate" or "none" (y * silu(gate); Falcon-H1's mamba_rms_norm=False).
    ssm_norm: Literal["gate_then_norm", "norm_then_gate", "none"] = "gate_then_norm"
    ssm_norm_eps: float | None = None  # eps of that norm (None: eps; Zamba2 fixes it at 1e-5)
    # RWKV-7: LoRA ranks of the decay, in-context learning rate, value-residual and gate LoRAs;
    # eps of the per-head GroupNorm on the read.
    rwkv_decay_lora: int = 0
    rwkv_a_lora: int = 0
    rwkv_v_lora: int = 0
    rwkv_gate_lora: int = 0
    group_norm_eps: float = 64e-5
    # xLSTM's mLSTM: soft cap of the input/forget gate logits (<= 0: none) and the eps added to the
    # read's normaliser.
    mlstm_gate_soft_cap: float = -1.0
    mlstm_eps: float = 1e-6
    # Full softmax attention layers of hybrids.
    n_attn_heads: int = 0
    n_kv_heads: int = 0
    d_head: int = 0
    rotary_dim: int = 0
    rope_theta: float = 10_000.0
    attn_output_gate: bool = True
    # RMSNorms on q and k: "per_head" (Qwen3.5), "all_heads" (one norm over all heads: OLMo-Hybrid),
    # "none" (the Mamba-2 hybrids).
    attn_qk_norm: Literal["per_head", "all_heads", "none"] = "per_head"
    attn_bias: bool = False  # biases on q/k/v/o projections
    attn_sliding_window: int = 0  # tokens a "sliding_attention" layer sees (LaraMini)
    attn_scale: float | None = None  # the scores' scale; None: d_head ** -0.5 (muP models set their own)
    # Multi-head latent attention (Kimi Linear's, BailingHybrid's attention layers): the query's LoRA rank (0: a full
    # q projection), the key/value latent's rank, the per-head key part, the key part shared by all
    # heads, and the value head size.
    mla_q_lora_rank: int = 0
    mla_kv_lora_rank: int = 0
    mla_qk_nope_dim: int = 0
    mla_qk_rope_dim: int = 0
    mla_v_head_dim: int = 0
    mla_head_gate: bool = False  # a sigmoid gate per head on the output (BailingHybrid)
    mla_norm_eps: float = 1e-6  # eps of the q / kv latent norms (Kimi Linear: 1e-6 whatever eps says)
    # MLP: dense (SwiGLU, or plain with mlp_gated=False) or a sparse mixture of experts with a shared expert.
    d_mlp: int = 0
    act_fn: str = "silu"
    mlp_bias: bool = False
    mlp_gated: bool = True  # down(act(gate) * up); False: down(act(up)) (NemotronH)
    # True: each mixer block ends with its own MLP; False: MLPs are layers of their own
    # (layer type "mlp", NemotronH), and mixer blocks have none.
    block_mlp: bool = True
    n_experts: int = 0
    n_experts_per_tok: int = 0
    d_expert: int = 0
    d_shared_expert: int = 0
    norm_topk_prob: bool = True
    shared_expert_gated: bool = True  # a sigmoid gate on the shared expert (Qwen3-Next; not Granite 4.0-H)
    # "softmax" (Qwen3-Next, Granite 4.0-H) or "sigmoid_group" (NemotronH: DeepSeek-V3 routing with
    # moe_n_group groups, the best moe_topk_group of them eligible, weights times moe_routed_scale).
    moe_router: Literal["softmax", "sigmoid_group"] = "softmax"
    moe_n_group: int = 1
    moe_topk_group: int = 1
    moe_routed_scale: float = 1.0
    moe_layers: list[bool] = field(default_factory=list)
    # Shared transformer blocks (Zamba2): hybrid layer i (counting hybrid layers only) runs shared
    # block i % n_shared_blocks on [resid | embeddings]; each invocation has its own LoRA adapters of
    # rank shared_adapter_rank on the MLP's gate/up projection, and on q/k/v if shared_attn_adapters.
    n_shared_blocks: int = 1
    shared_adapter_rank: int = 0
    shared_attn_adapters: bool = False
    # SwiGLU clipping per layer (BailingHybrid): act(gate) <= L and |up| <= L inside the routed
    # experts (swiglu_limits) and the shared expert (swiglu_limits_shared) of group-routed MoE layers;
    # 0, or an empty list: no clipping.
    swiglu_limits: list[float] = field(default_factory=list)
    swiglu_limits_shared: list[float] = field(default_factory=list)
    # GLM-5.3: the gate is clipped *before* the activation, act(min(gate, L)), and the dense MLPs clip
    # too, at swiglu_limit_dense (0: not).
    swiglu_clip_before_act: bool = False
    swiglu_limit_dense: float = 0.0
    # Norms: Qwen3.5 / Qwen3-Next RMSNorms scale by (1 + w); Mamba-2 uses plain RMSNorms,
    # RWKV-7 LayerNorms with bias (norm_type="layernorm").
    eps: float = 1e-6
    norm_zero_centered: bool = True
    norm_type: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    tie_word_embeddings: bool = True
    # muP multipliers: embeddings times embedding_multiplier, logits / logits_divisor (Granite 4.0-H,
    # Falcon-H1); every block output (mixer, MLP) times residual_multiplier before it joins the
    # residual stream (Granite 4.0-H). Falcon-H1's other multipliers are folded into its weights.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_divisor: float = 1.0
    # Logits soft cap ``cap * tanh(logits / cap)`` after the unembedding (xLSTM); <= 0: none
    # (TransformerLens's field and convention).
    output_logits_soft_cap: float = -1.0
    # MiniMax's residual: the sublayer's *normed input* is the residual (normed_residual), and
    # residual_factors[slot] = (alpha, beta) weigh it, ``alpha * base + beta * sublayer(...)``, per
    # block slot ("mixer", "attn", "mlp"; absent: (1, 1)).
    normed_residual: bool = False
    residual_factors: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Hyper-connections (Qwen4-Exp): the residual stream is hc_count streams of d_model side by side,
    # [batch, pos, hc_count * d_model]; each sublayer reads a learned mix of them (rank hc_lowrank) and
    # writes into each with a learned weight. 1: one ordinary residual stream.
    hc_count: int = 1
    hc_lowrank: int = 0
    # "manifold": GLM-5.3-Flash's mHC instead (per sublayer: input weights, output weights and a doubly
    # stochastic hc x hc mix of the streams, from hc_sinkhorn_iters Sinkhorn iterations with floor hc_eps).
    hc_type: Literal["lowrank", "manifold"] = "lowrank"
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # Qwen4-Exp's QSA indexer on "indexed_attention" layers: each query attends only to the tokens of
    # the indexer_budget / indexer_compress_ratio best-scoring complete blocks of indexer_compress_ratio
    # tokens, plus the incomplete last block; indexer_n_heads query heads, one key head.
    indexer_n_heads: int = 0
    indexer_head_dim: int = 0
    indexer_budget: int = 0
    indexer_compress_ratio: int = 0
    # GLM-5.3's k-pool indexer ("indexed_latent_attention" layers, same four fields: n_heads, head_dim,
    # budget = index_topk, compress ratio = index_kpool): also select the incomplete last pool's tokens.
    indexer_tail: bool = True
    # Qwen4-Exp's Per-Layer Embeddings ("gated_deltanet_hc_ple" layers): hashed n-grams of orders
    # 2..ngram_size, heads_per_ngram heads each, ple_embed_dim wide in all, from a table of
    # ple_ngram_rows[layer] rows (its own per layer); a depthwise conv of ple_conv_kernel taps
    # ngram_size tokens apart.
    ple_embed_dim: int = 0
    ple_ngram_rows: list[int] = field(default_factory=list)
    ple_conv_kernel: int = 4
    ngram_size: int = 3
    heads_per_ngram: int = 0
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
        from hooked_ssm.families import layer_kind  # the table imports the components, which import this

        kinds = [layer_kind(name) for name in self.layer_types]
        if any(kind.grouped_keys for kind in kinds) and (self.n_key_heads <= 0 or self.n_heads % self.n_key_heads):
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a positive multiple of n_key_heads ({self.n_key_heads})."
            )
        if self.n_shared_blocks < 1:
            raise ValueError(f"n_shared_blocks must be at least 1 (Zamba2's num_mem_blocks), not {self.n_shared_blocks}.")
        if self.norm_type not in ("rmsnorm", "layernorm"):
            raise ValueError(f"norm_type must be 'rmsnorm' or 'layernorm', not {self.norm_type!r}.")
        self.time_step_limit = (float(self.time_step_limit[0]), float(self.time_step_limit[1]))
        if not self.moe_layers:
            self.moe_layers = [self.n_experts > 0] * self.n_layers
        if self.execution not in ("chunked", "recurrent"):
            raise ValueError(f"execution must be 'chunked' or 'recurrent', not {self.execution!r}.")
        if self.hc_count < 1:
            raise ValueError(f"hc_count must be >= 1 (1: an ordinary residual stream), got {self.hc_count}.")
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def d_resid(self) -> int:
        """Width of the residual stream between blocks: ``hc_count * d_model``."""
        return self.hc_count * self.d_model

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dtype"] = str(self.dtype).removeprefix("torch.")
        return d
