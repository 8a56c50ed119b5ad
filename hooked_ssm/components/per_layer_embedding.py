"""Qwen4-Exp's Per-Layer Embedding (PLE): hashed n-gram features of the tokens, added to every
hyper-connection stream before the layer's mixer reads them::

    e = ngram_embedding(tokens)                                   [ple_embed]
    g_i = <norm(W_key e)_i, norm(resid)_i> / sqrt(d_model)        one gate per stream i
    v_i = sigmoid(sign(g_i) sqrt(|g_i|)) * W_value e              hook_gated_value: [hc, d_model]
    out = v + silu(dilated_conv(norm(v)))                         hook_out: [hc * d_model]

The depthwise convolution has ``ple_conv_kernel`` taps ``ngram_size`` tokens apart; its window and
the last ``ngram_size - 1`` tokens are the layer's decoding cache. Pads feed zeros to the
convolution, and are read as EOS by the n-grams.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from hooked_ssm.components.ngram_embedding import NGramEmbedding
from hooked_ssm.components.norms import RMSNorm
from hooked_ssm.components.padding import fill_pads, real_tokens
from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.state import PLEMixerCache


class PerLayerEmbedding(nn.Module):
    def __init__(self, cfg: HookedSSMConfig, layer: int):
        super().__init__()
        self.hc, self.d_model = cfg.hc_count, cfg.d_model
        self.embedding = NGramEmbedding(cfg, layer)
        self.key_proj = nn.Linear(cfg.ple_embed_dim, cfg.d_resid, bias=False)
        self.value_proj = nn.Linear(cfg.ple_embed_dim, cfg.d_model, bias=False)
        self.norm_key = RMSNorm(cfg.d_resid, cfg.eps, cfg.norm_zero_centered, group_size=cfg.d_model)
        self.norm_query = RMSNorm(cfg.d_resid, cfg.eps, cfg.norm_zero_centered, group_size=cfg.d_model)
        self.norm_conv = RMSNorm(cfg.d_resid, cfg.eps, cfg.norm_zero_centered, group_size=cfg.d_model)
        self.dilation = cfg.ngram_size
        self.conv_weight = nn.Parameter(torch.zeros(cfg.d_resid, 1, cfg.ple_conv_kernel))
        self.window = (cfg.ple_conv_kernel - 1) * self.dilation  # past inputs the convolution reads

        self.hook_gate = HookPoint()  # [batch, pos, hc]: g_i, before the signed square root
        self.hook_gated_value = HookPoint()  # [batch, pos, hc, d_model]
        self.hook_out = HookPoint()  # [batch, pos, hc * d_model]: added to the residual stream

    def forward(
        self,
        resid: Float[Tensor, "batch pos hc_d_model"],
        tokens: Int[Tensor, "batch pos"],
        cache: PLEMixerCache | None = None,
        attention_mask: Tensor | None = None,
    ) -> Float[Tensor, "batch pos hc_d_model"]:
        real = real_tokens(attention_mask, resid.shape[1])
        if real is not None:
            tokens = torch.where(real, tokens, self.embedding.eos)
        embedded, context = self.embedding(tokens, None if cache is None else cache.ngram_context)
        key = self.norm_key(self.key_proj(embedded)).unflatten(-1, (self.hc, self.d_model))
        query = self.norm_query(resid).unflatten(-1, (self.hc, self.d_model))
        gate = self.hook_gate((key * query).sum(dim=-1) / self.d_model**0.5)
        gate = gate.abs().clamp_min(1e-6).sqrt() * gate.sign()
        value = self.hook_gated_value(torch.sigmoid(gate)[..., None] * self.value_proj(embedded)[..., None, :])
        value = value.flatten(-2)
        conv_in = fill_pads(self.norm_conv(value), real)
        value = fill_pads(value, real)
        past = None if cache is None else cache.ple_conv_state
        if past is None:
            past = conv_in.new_zeros(conv_in.shape[0], self.window, conv_in.shape[-1])
        window = torch.cat([past, conv_in], dim=1)
        conv = F.conv1d(window.transpose(1, 2), self.conv_weight, dilation=self.dilation, groups=window.shape[-1])
        if cache is not None:
            cache.ngram_context, cache.ple_conv_state = context, window[:, -self.window :]
        return self.hook_out(value + F.silu(conv).transpose(1, 2))
