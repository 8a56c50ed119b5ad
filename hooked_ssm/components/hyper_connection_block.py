"""The block of a model with hyper-connections (Qwen4-Exp's ``HyperConnection``, or GLM-5.3's
``ManifoldHyperConnection`` with ``cfg.hc_type="manifold"``, which norms the sublayer's input itself):
no residual norms; each sublayer reads its input from the streams through its connection (``hc1``
before the token mixer, ``hc2`` before the MLP) and is written back into the streams with that
connection's weights::

    x, w = hc1(resid);  resid = resid + w (x) mixer(x)       hook_mixer_out / hook_attn_out = mixer(x)
    x, w = hc2(resid);  resid = resid + w (x) mlp(x)         hook_mlp_out = mlp(x)

The residual hooks (``hook_resid_pre/mid/post``) are ``[batch, pos, hc * d_model]``; the sublayer
outputs ``[batch, pos, d_model]``. The token mixer is the layer kind's (``.mixer`` or ``.attn``).
A layer kind that reads the token ids (``reads_tokens``) first adds their Per-Layer Embedding to
the streams (``.ple``; ``hook_resid_pre`` is before it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from hooked_ssm.components.hyper_connection import HyperConnection
from hooked_ssm.components.manifold_hyper_connection import ManifoldHyperConnection
from hooked_ssm.components.mlp import build_mlp
from hooked_ssm.components.per_layer_embedding import PerLayerEmbedding
from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.state import AttentionCache, MixerCache


class HyperConnectionBlock(nn.Module):
    def __init__(self, cfg: HookedSSMConfig, layer: int, earlier: Sequence[nn.Module] = ()):
        super().__init__()
        from hooked_ssm.families import layer_kind  # the table names this block

        self.layer_type = cfg.layer_types[layer]
        kind = layer_kind(self.layer_type)
        if kind.slot not in ("mixer", "attn"):
            raise ValueError(f"A hyper-connection block holds a token mixer, not a {kind.slot!r} layer.")
        self.slot = kind.slot
        self.ple = PerLayerEmbedding(cfg, layer) if kind.reads_tokens else None
        connection = ManifoldHyperConnection if cfg.hc_type == "manifold" else HyperConnection
        self.hc1 = connection(cfg)
        setattr(self, self.slot, kind.mixer(cfg, **kind.options))
        self.hc2 = connection(cfg)
        self.mlp = build_mlp(cfg, layer)

        self.hook_resid_pre = HookPoint()  # [batch, pos, hc * d_model]
        setattr(self, f"hook_{self.slot}_out", HookPoint())  # [batch, pos, d_model]
        self.hook_resid_mid = HookPoint()  # [batch, pos, hc * d_model]
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, hc * d_model]

    def forward(
        self,
        resid: Float[Tensor, "batch pos hc_d_model"],
        cache: MixerCache | AttentionCache | None = None,
        attention_mask: Tensor | None = None,
        state_positions: Sequence[int] | None = None,
        tokens: Int[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, "batch pos hc_d_model"]:
        resid = self.hook_resid_pre(resid)
        if self.ple is not None:
            if tokens is None:
                raise ValueError("This layer's Per-Layer Embedding reads the token ids: pass tokens=.")
            resid = resid + self.ple(resid, tokens, cache, attention_mask)
        x, weights = self.hc1(resid)
        if self.slot == "attn":  # attention has no state to materialise
            out = self.attn(x, cache, attention_mask)
        else:
            out = self.mixer(x, cache, attention_mask, state_positions)
        out = getattr(self, f"hook_{self.slot}_out")(out)
        resid = self.hook_resid_mid(self.hc1.inject(resid, out, weights))
        x, weights = self.hc2(resid)
        out = self.hook_mlp_out(self.mlp(x))
        return self.hook_resid_post(self.hc2.inject(resid, out, weights))
