"""Manifold-constrained hyper-connections (mHC; GLM-5.3-Flash's ``Glm5NextTextHyperConnection``): the
residual stream is ``hc`` streams of ``d_model`` side by side, ``[batch, pos, hc * d_model]``. Before
each sublayer, from the streams ``s_1 .. s_hc`` flattened and RMS-normed without a weight (``n``)::

    pre  = sigmoid(a_pre  W_pre  n + b_pre) + eps          [hc]        hook_read_weights
    post = 2 sigmoid(a_post W_post n + b_post)             [hc]        hook_write_weights
    comb = sinkhorn(softmax(a_comb W_comb n + b_comb) + eps)  [hc, hc]  hook_mix (doubly stochastic)
    x    = rmsnorm(sum_i pre_i s_i)                        [d_model]   hook_in: the sublayer's input

(``.ln`` is the sublayer's own input norm, ``input_layernorm`` / ``post_attention_layernorm``), and after
it stream ``i`` becomes ``post_i * sublayer(x) + sum_j comb_ji s_j`` (``inject``). The model's read-out
is ``ManifoldHyperConnectionReadout``: the mean of the streams, RMS-normed.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from hooked_ssm.components.norms import RMSNorm
from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.dtypes import at_least_fp32

MixWeights = tuple[Float[Tensor, "batch pos hc"], Float[Tensor, "batch pos hc hc"]]


class ManifoldHyperConnection(nn.Module):
    def __init__(self, cfg: HookedSSMConfig):
        super().__init__()
        if cfg.hc_count < 2 or cfg.hc_sinkhorn_iters < 1:
            raise ValueError(f"Manifold hyper-connections need hc_count >= 2 and hc_sinkhorn_iters >= 1; got "
                             f"{cfg.hc_count}, {cfg.hc_sinkhorn_iters}.")
        self.hc, self.d_model = cfg.hc_count, cfg.d_model
        self.eps, self.hc_eps, self.sinkhorn_iters = cfg.eps, cfg.hc_eps, cfg.hc_sinkhorn_iters
        n_weights = (2 + self.hc) * self.hc  # pre, post, comb
        self.fn = nn.Parameter(torch.empty(n_weights, cfg.d_resid))
        nn.init.normal_(self.fn, std=0.02)
        self.base = nn.Parameter(torch.zeros(n_weights))
        self.scale = nn.Parameter(torch.ones(3))
        self.ln = RMSNorm(cfg.d_model, cfg.eps, cfg.norm_zero_centered)

        self.hook_read_weights = HookPoint()  # [batch, pos, hc]: pre, each stream's weight in the sublayer's input
        self.hook_write_weights = HookPoint()  # [batch, pos, hc]: post, the sublayer output's weight in each stream
        self.hook_mix = HookPoint()  # [batch, pos, hc, hc]: comb, stream j's weight in new stream i at [j, i]
        self.hook_in = HookPoint()  # [batch, pos, d_model]: x, the normed input of the sublayer

    def forward(
        self, resid: Float[Tensor, "batch pos hc_d_model"]
    ) -> tuple[Float[Tensor, "batch pos d_model"], MixWeights]:
        """The sublayer's input and ``(post, comb)``, the weights ``inject`` writes back with."""
        hc = self.hc
        flat = at_least_fp32(resid)
        flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + self.eps)
        pre_w, post_w, comb_w = F.linear(flat, at_least_fp32(self.fn)).split([hc, hc, hc * hc], dim=-1)
        pre_b, post_b, comb_b = at_least_fp32(self.base).split([hc, hc, hc * hc])
        pre_scale, post_scale, comb_scale = at_least_fp32(self.scale).unbind(0)
        pre = self.hook_read_weights(torch.sigmoid(pre_w * pre_scale + pre_b) + self.hc_eps)
        post = self.hook_write_weights(2 * torch.sigmoid(post_w * post_scale + post_b))
        comb = torch.softmax(comb_w.unflatten(-1, (hc, hc)) * comb_scale + comb_b.view(hc, hc), dim=-1) + self.hc_eps
        # Sinkhorn-Knopp: columns, then (rows, columns) sinkhorn_iters - 1 more times (transformers' order).
        comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        for _ in range(self.sinkhorn_iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + self.hc_eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        comb = self.hook_mix(comb)
        collapsed = (pre.unsqueeze(-1) * resid.unflatten(-1, (hc, self.d_model))).sum(dim=-2).to(resid.dtype)
        return self.hook_in(self.ln(collapsed)), (post, comb)

    @staticmethod
    def inject(
        resid: Float[Tensor, "batch pos hc_d_model"], out: Float[Tensor, "batch pos d_model"], weights: MixWeights
    ) -> Float[Tensor, "batch pos hc_d_model"]:
        """Stream ``i``: ``post_i * out + sum_j comb_ji s_j``."""
        post, comb = weights
        streams = resid.unflatten(-1, (post.shape[-1], -1))
        mixed = torch.matmul(comb.to(resid.dtype).transpose(-1, -2), streams)
        return (post.to(resid.dtype).unsqueeze(-1) * out.unsqueeze(-2) + mixed).flatten(-2)


class ManifoldHyperConnectionReadout(nn.Module):
    """``ln_final`` of a model with manifold hyper-connections: the mean of the streams, RMS-normed
    (``Glm5NextTextHyperHead`` then the model's ``norm``)."""

    def __init__(self, cfg: HookedSSMConfig):
        super().__init__()
        self.hc = cfg.hc_count
        self.norm = RMSNorm(cfg.d_model, cfg.eps, cfg.norm_zero_centered)
        self.hook_in = HookPoint()  # [batch, pos, d_model]: the mean of the streams, before the norm

    def forward(self, resid: Float[Tensor, "batch pos hc_d_model"]) -> Float[Tensor, "batch pos d_model"]:
        return self.norm(self.hook_in(resid.unflatten(-1, (self.hc, -1)).mean(dim=-2)))
