"""The table of families: what every other part of HookedSSM reads to know what a layer or a
checkpoint is.

Two kinds of rows:

- ``LAYER_KINDS``: one row per kind of token mixer a layer can hold (``cfg.layer_types`` entries):
  its component class, the decoding cache it carries, whether it uses grouped keys, and the block
  that wraps it. ``HookedSSMConfig`` validates against it, ``build_blocks`` builds from it,
  ``RecurrentState.empty`` allocates from it. What a mixer hooks, and the size of each hook per
  head (``HOOK_DIMS``, read by SAE splicing), is declared on the mixer class itself, next to the
  code that fires the hooks.
- ``CHECKPOINT_FAMILIES``: one row per checkpoint family: the converter module in
  ``hooked_ssm.pretrained`` (reads the config, consumes every tensor), the transformers
  architectures and ``model_type`` values that identify it. ``load_pretrained`` detects and
  converts through it.

Adding a family is one component file (if its mixer is new), one converter, and a row here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Literal

import torch.nn as nn

from hooked_ssm.components.attention import GatedAttention
from hooked_ssm.components.gated_deltanet import GatedDeltaNetMixer
from hooked_ssm.components.hyper_connection_block import HyperConnectionBlock
from hooked_ssm.components.indexed_attention import IndexedAttention
from hooked_ssm.components.indexed_latent_attention import IndexedLatentAttention
from hooked_ssm.components.kimi_delta_attention import KimiDeltaAttentionMixer
from hooked_ssm.components.latent_attention import LatentAttention
from hooked_ssm.components.lightning_attention import LightningAttentionMixer
from hooked_ssm.components.mamba2 import Mamba2Mixer
from hooked_ssm.components.mlstm import MLSTMCache, MLSTMMixer
from hooked_ssm.components.parallel_hybrid import ParallelHybridBlock
from hooked_ssm.components.rwkv7 import RWKV7Block, RWKV7Mixer
from hooked_ssm.components.shared_transformer import HYBRID_KIND, SharedTransformerMamba2Block
from hooked_ssm.state import (
    AttentionCache,
    IndexedAttentionCache,
    MixerCache,
    NoCache,
    ParallelCache,
    PLEMixerCache,
    RWKV7Cache,
)


@dataclass(frozen=True)
class LayerKind:
    """A kind of token mixer (``cfg.layer_types`` entry)."""

    # Built as ``mixer(cfg)`` by the default ``Block``; None: the layer is an MLP (``build_mlp``).
    mixer: type[nn.Module] | None
    cache: type  # the per-layer decoding cache (``RecurrentState.layers[l]``)
    # Where the block holds the mixer and the name of its output hook: recurrent mixers at
    # ``.mixer`` / ``hook_mixer_out``, softmax attention at ``.attn`` / ``hook_attn_out`` (TransformerLens),
    # MLP layers at ``.mlp`` / ``hook_mlp_out``.
    slot: Literal["mixer", "attn", "mlp"] = "mixer"
    grouped_keys: bool = False  # n_key_heads key groups serve n_heads heads (cfg checks the ratio)
    block: type[nn.Module] | None = None  # a block of its own; None: the pre-norm ``Block``
    # ``Block`` norms the sublayers' outputs instead of their inputs (OLMo-Hybrid's attention layers).
    post_norm: bool = False
    options: dict[str, bool] = field(default_factory=dict)  # keyword arguments of ``mixer(cfg, **options)``
    # The block also reads the token embeddings (``forward(..., embeddings=)``: Zamba2's shared blocks).
    reads_embeddings: bool = False
    # The block also reads the token ids (``forward(..., tokens=)``: Qwen4-Exp's Per-Layer Embeddings).
    reads_tokens: bool = False


LAYER_KINDS: dict[str, LayerKind] = {
    "gated_deltanet": LayerKind(GatedDeltaNetMixer, MixerCache, grouped_keys=True),
    "mamba2": LayerKind(Mamba2Mixer, MixerCache, grouped_keys=True),
    "rwkv7": LayerKind(RWKV7Mixer, RWKV7Cache, block=RWKV7Block),
    "full_attention": LayerKind(GatedAttention, AttentionCache, slot="attn"),
    "full_attention_post_norm": LayerKind(GatedAttention, AttentionCache, slot="attn", post_norm=True),
    "full_attention_nope": LayerKind(GatedAttention, AttentionCache, slot="attn", options={"rotary": False}),
    "sliding_attention": LayerKind(GatedAttention, AttentionCache, slot="attn", options={"sliding": True}),
    "lightning_attention": LayerKind(LightningAttentionMixer, MixerCache),
    "mlstm": LayerKind(MLSTMMixer, MLSTMCache),  # xLSTM
    "kimi_delta_attention": LayerKind(KimiDeltaAttentionMixer, MixerCache, grouped_keys=True),  # n_key_heads = n_heads
    "latent_attention": LayerKind(LatentAttention, AttentionCache, slot="attn"),  # Kimi Linear's MLA, no RoPE
    "latent_attention_rope": LayerKind(LatentAttention, AttentionCache, slot="attn", options={"rotary": True}),
    "mlp": LayerKind(None, NoCache, slot="mlp"),  # NemotronH's MLP / MoE layers
    # Falcon-H1: Mamba-2 and attention side by side in one block
    "mamba2_parallel_attention": LayerKind(Mamba2Mixer, ParallelCache, grouped_keys=True, block=ParallelHybridBlock),
    # Zamba2: a shared transformer block on [resid | embeddings] feeding a Mamba-2 mixer
    HYBRID_KIND: LayerKind(Mamba2Mixer, ParallelCache, grouped_keys=True, block=SharedTransformerMamba2Block,
                           reads_embeddings=True),
    # Qwen4-Exp: a residual stream of cfg.hc_count hyper-connected streams, Per-Layer Embeddings (of
    # the token ids) on some GDN layers, attention narrowed by its QSA indexer
    "gated_deltanet_hc": LayerKind(GatedDeltaNetMixer, MixerCache, grouped_keys=True, block=HyperConnectionBlock),
    "gated_deltanet_hc_ple": LayerKind(GatedDeltaNetMixer, PLEMixerCache, grouped_keys=True, block=HyperConnectionBlock,
                                       reads_tokens=True),
    "indexed_attention_hc": LayerKind(IndexedAttention, IndexedAttentionCache, slot="attn", block=HyperConnectionBlock),
    # GLM-5.3-Flash: KDA and latent attention narrowed by its k-pool indexer, in a hyper-connection
    # block (cfg.hc_type="manifold")
    "kimi_delta_attention_hc": LayerKind(KimiDeltaAttentionMixer, MixerCache, grouped_keys=True, block=HyperConnectionBlock),
    "indexed_latent_attention_hc": LayerKind(IndexedLatentAttention, IndexedAttentionCache, slot="attn",
                                             block=HyperConnectionBlock),
}


@dataclass(frozen=True)
class CheckpointFamily:
    """A family of checkpoints and the converter that reads it."""

    name: str  # as in the README's supported-models table
    # Module in hooked_ssm.pretrained with ``read_checkpoint(source, raw_config, architecture, defaults)
    # -> (config fields, raw state dict)`` and ``convert_state_dict(state, cfg)``; optionally
    # ``architecture_of(raw_config)`` for configs that name neither an architecture nor a model_type.
    converter: str
    architectures: tuple[str, ...]  # ``architectures`` entries of config.json (and pseudo-architectures)
    model_types: tuple[str, ...] = field(default=())  # for a config.json without ``architectures``

    @property
    def module(self) -> ModuleType:
        # Imported on use: the converters import the config, which reads LAYER_KINDS from here.
        return importlib.import_module(f"hooked_ssm.pretrained.{self.converter}")


CHECKPOINT_FAMILIES: tuple[CheckpointFamily, ...] = (
    CheckpointFamily(
        "Gated DeltaNet hybrids: Qwen3.5 (dense and MoE), Qwen3-Next", "qwen3_5",
        ("Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration", "Qwen3NextForCausalLM",
         "Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration"),
    ),
    CheckpointFamily("Mamba-2", "mamba2", ("Mamba2ForCausalLM", "mamba_ssm"), ("mamba2",)),
    CheckpointFamily("RWKV-7", "rwkv7", ("RWKV7ForCausalLM", "rwkv7_blinkdl"), ("rwkv7", "rwkv7_fla")),
    CheckpointFamily("Bamba", "bamba", ("BambaForCausalLM",), ("bamba",)),
    CheckpointFamily("Granite 4.0-H", "granitemoehybrid", ("GraniteMoeHybridForCausalLM",), ("granitemoehybrid",)),
    CheckpointFamily("NemotronH", "nemotron_h", ("NemotronHForCausalLM",), ("nemotron_h",)),
    CheckpointFamily("Falcon-H1", "falcon_h1", ("FalconH1ForCausalLM",), ("falcon_h1",)),
    CheckpointFamily("OLMo-Hybrid", "olmo_hybrid", ("OlmoHybridForCausalLM",), ("olmo_hybrid",)),
    CheckpointFamily("LaraMini", "lara_mini", ("LaraMiniForCausalLM",), ("lara_mini",)),
    CheckpointFamily("MiniMax", "minimax", ("MiniMaxForCausalLM",), ("minimax",)),
    CheckpointFamily("xLSTM", "xlstm", ("xLSTMForCausalLM",), ("xlstm",)),
    CheckpointFamily("Zamba2", "zamba2", ("Zamba2ForCausalLM",), ("zamba2",)),
    CheckpointFamily("Qwen4-Exp", "qwen4_exp", ("Qwen4ExpForCausalLM",), ("qwen4_exp_text",)),
    CheckpointFamily("Kimi Linear", "kimi_linear", ("KimiLinearForCausalLM",), ("kimi_linear",)),
    CheckpointFamily("BailingHybrid (Ling 3)", "bailing_hybrid", ("BailingHybridForCausalLM",), ("bailing_hybrid",)),
    CheckpointFamily("Glm5Next (GLM-5.3-Flash)", "glm5_next", ("Glm5NextForConditionalGeneration",), ("glm5_next",)),
)


def layer_kind(name: str) -> LayerKind:
    try:
        return LAYER_KINDS[name]
    except KeyError:
        raise ValueError(f"Unsupported layer type {name!r}; supported: {sorted(LAYER_KINDS)}.") from None


def family_of_architecture(architecture: str) -> CheckpointFamily | None:
    return next((family for family in CHECKPOINT_FAMILIES if architecture in family.architectures), None)
