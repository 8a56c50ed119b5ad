"""``RecurrentState``: the O(1)-per-token decoding cache of a HookedSSM.

A recurrent mixer layer carries its short-convolution window and its matrix state (Gated DeltaNet,
Mamba-2), an RWKV-7 layer its two token-shift vectors and its matrix state, and a full attention
layer of a hybrid carries an ordinary key/value cache. Passing the same
``RecurrentState`` to successive ``forward`` calls continues the sequence exactly where the
previous call stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


@dataclass
class MixerCache:
    conv_state: Float[Tensor, "batch channel kernel_minus_1"] | None = None
    ssm_state: Float[Tensor, "batch head d_k d_v"] | None = None  # float32, key-major


@dataclass
class PLEMixerCache(MixerCache):
    """A mixer layer with a Per-Layer Embedding (Qwen4-Exp): also the PLE convolution's window and the
    last tokens its n-grams read, plus one (0 or None: before the first token)."""

    ple_conv_state: Float[Tensor, "batch window hc_d_model"] | None = None
    ngram_context: Int[Tensor, "batch context"] | None = None


@dataclass
class RWKV7Cache:
    """RWKV-7 layer: the previous token's normed inputs of the time mix and of the channel mix
    (the token-shift "x_prev" vectors) and the key-major matrix state."""

    mixer_shift: Float[Tensor, "batch d_model"] | None = None
    ssm_state: Float[Tensor, "batch head d_k d_v"] | None = None  # float32, key-major
    mlp_shift: Float[Tensor, "batch d_model"] | None = None


@dataclass
class AttentionCache:
    """Keys (after RoPE) and values of the tokens consumed so far, one slot per token.

    Rows that continue prefixes of *different* lengths in one batch (e.g. batched interventions at
    different positions) hold a ragged cache: ``keys``/``values`` are right-padded to a common
    number of slots, ``key_mask`` marks the real slots and ``row_lengths`` counts each row's tokens
    (the absolute position of its next token, which the rotary embedding needs). Both are None for
    an ordinary cache, where the slot index is the position.
    """

    keys: Float[Tensor, "batch pos kv_head d_head"] | None = None
    values: Float[Tensor, "batch pos kv_head d_head"] | None = None
    key_mask: Bool[Tensor, "batch pos"] | None = None
    row_lengths: Int[Tensor, "batch"] | None = None

    @property
    def length(self) -> int:
        """Number of slots (the longest row's length when ragged)."""
        return 0 if self.keys is None else self.keys.shape[1]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.key_mask is not None:
            self.key_mask = torch.cat([self.key_mask, self.key_mask.new_ones(k.shape[:2])], dim=1)
            self.row_lengths = self.row_lengths + k.shape[1]
        self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=1)
        self.values = v if self.values is None else torch.cat([self.values, v], dim=1)
        return self.keys, self.values


@dataclass
class IndexedAttentionCache(AttentionCache):
    """An attention layer with an indexer: also the raw index keys of every slot (GLM-5.3's k-pool
    indexer: ``[key | pooling logit]``) and their RoPE positions (Qwen4-Exp's QSA indexer) (``per_slot``:
    a ragged stack pads them like the keys)."""

    index_keys: Float[Tensor, "batch pos d_index"] | None = field(default=None, metadata={"per_slot": True})
    index_positions: Int[Tensor, "batch pos"] | None = field(default=None, metadata={"per_slot": True})


@dataclass
class ParallelCache(AttentionCache):
    """A layer that runs a Mamba-2 mixer and attention side by side (Falcon-H1): one flat cache that
    serves as both (the attention's keys and values, the mixer's conv window and state), so that
    every cached tensor is a field of the layer's cache, as in the other kinds."""

    conv_state: Float[Tensor, "batch channel kernel_minus_1"] | None = None
    ssm_state: Float[Tensor, "batch head d_k d_v"] | None = None  # float32, key-major


@dataclass
class NoCache:
    """A layer without state (NemotronH's MLP layers)."""


@dataclass
class RecurrentState:
    """Per-layer caches plus the number of tokens already consumed."""

    layers: list[MixerCache | PLEMixerCache | RWKV7Cache | AttentionCache | IndexedAttentionCache | ParallelCache | NoCache] = field(default_factory=list)
    n_tokens: int = 0

    @classmethod
    def empty(cls, layer_types: list[str]) -> "RecurrentState":
        from hooked_ssm.families import layer_kind  # the table imports the cache classes from here

        return cls([layer_kind(kind).cache() for kind in layer_types])
