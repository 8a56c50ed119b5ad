"""Zamba2's hybrid layers: a transformer block whose weights several layers share, feeding a Mamba-2
mixer. Per hybrid layer (``shared_transformer`` is one invocation of the shared block)::

    x     = ln1([resid | embeddings])          2 d_model wide    shared_transformer.hook_in (before ln1)
    a     = attn(x)                                              shared_transformer.hook_attn_out
    m     = mlp(ln2(a))                                          shared_transformer.hook_mlp_out
    t     = linear(m)                                            shared_transformer.hook_out
    resid = resid + mixer(ln1(resid + t))                        hook_mixer_out

The transformer adds to the mixer's input only, never to the residual stream itself; ``embeddings``
are the token embeddings (``hook_embed``), which every hybrid layer reads again.

Weights: hybrid layer ``i`` (counting hybrid layers only) runs shared block ``i % n_shared_blocks``.
Its norms, attention projections and MLP weights are the *same* ``nn.Parameter`` objects as those
of the first layer running that block (stored once, as transformers ties Zamba2's
``shared_transformer``; the state dict lists each under every layer, like tied embeddings). Its own
are the LoRA adapters (``*.adapter``: the MLP's gate/up projection always, q/k/v with
``cfg.shared_attn_adapters``) and ``linear``. Every invocation has its own modules, so its own
hook points: ``blocks.4.shared_transformer.attn.hook_pattern`` is layer 4's attention pattern
only, though layer 1 runs the same weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint
from transformers.activations import ACT2FN

from hooked_ssm.components.attention import GatedAttention
from hooked_ssm.components.mamba2 import Mamba2Mixer
from hooked_ssm.components.norms import RMSNorm
from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.state import ParallelCache

HYBRID_KIND = "mamba2_shared_transformer"  # this block's cfg.layer_types entry (hooked_ssm.families)


class AdaptedLinear(nn.Linear):
    """``x W^T + b + B (A x)``: a linear map whose weight is shared between invocations, plus the
    invocation's own low-rank adapter ``adapter = (A, B)`` (Zamba2's LoRA adapters)."""

    def __init__(self, d_in: int, d_out: int, rank: int, bias: bool = False):
        super().__init__(d_in, d_out, bias=bias)
        self.adapter = nn.Sequential(nn.Linear(d_in, rank, bias=False), nn.Linear(rank, d_out, bias=False))

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        return super().forward(x) + self.adapter(x)


class AdaptedGatedMLP(nn.Module):
    """``down(act(gate) * up)`` with ``[gate | up] = gate_up_proj(x)`` (one projection with its adapter)."""

    def __init__(self, d_model: int, d_mlp: int, act_fn: str, rank: int, bias: bool):
        super().__init__()
        self.gate_up_proj = AdaptedLinear(d_model, 2 * d_mlp, rank, bias)
        self.down_proj = nn.Linear(d_mlp, d_model, bias=bias)
        self.act = ACT2FN[act_fn]
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]: gate pre-activation
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]: act(gate) * up

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.hook_post(self.act(self.hook_pre(gate)) * up))


class SharedTransformer(nn.Module):
    """One invocation of a shared transformer block: norm of ``[resid | embeddings]``, attention,
    norm, MLP (no residual connections inside), then its own ``linear`` back to ``d_model``."""

    def __init__(self, cfg: HookedSSMConfig):
        super().__init__()
        rank = cfg.shared_adapter_rank
        self.ln1 = RMSNorm(2 * cfg.d_model, cfg.eps, cfg.norm_zero_centered)
        self.attn = GatedAttention(cfg, d_in=2 * cfg.d_model)
        if cfg.shared_attn_adapters:
            for name in ("q_proj", "k_proj", "v_proj"):
                plain = getattr(self.attn, name)
                setattr(self.attn, name, AdaptedLinear(plain.in_features, plain.out_features, rank, cfg.attn_bias))
        self.ln2 = RMSNorm(cfg.d_model, cfg.eps, cfg.norm_zero_centered)
        self.mlp = AdaptedGatedMLP(cfg.d_model, cfg.d_mlp, cfg.act_fn, rank, cfg.mlp_bias)
        self.linear = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.hook_in = HookPoint()  # [batch, pos, 2*d_model]: [resid | embeddings], before ln1
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model]
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_out = HookPoint()  # [batch, pos, d_model]: linear(mlp out), added to the mixer's input

    def shared_parameter_names(self) -> list[str]:
        """The parameters of the shared block (all but the adapters and ``linear``)."""
        return [name for name, _ in self.named_parameters() if ".adapter." not in name and not name.startswith("linear.")]

    def tie_to(self, source: "SharedTransformer") -> None:
        """Make the shared block's parameters the very ``nn.Parameter`` objects of ``source``."""
        for name in self.shared_parameter_names():
            owner, _, leaf = name.rpartition(".")
            setattr(self.get_submodule(owner), leaf, source.get_parameter(name))

    def forward(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        embeddings: Float[Tensor, "batch pos d_model"],
        cache: ParallelCache | None = None,
        attention_mask: Tensor | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        x = self.hook_in(torch.cat([resid, embeddings.to(resid.dtype)], dim=-1))
        attended = self.hook_attn_out(self.attn(self.ln1(x), cache, attention_mask))
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(attended)))
        return self.hook_out(self.linear(mlp_out))


class SharedTransformerMamba2Block(nn.Module):
    """A Zamba2 hybrid layer: the shared transformer's output joins the input of a Mamba-2 mixer,
    whose output joins the residual stream (module docstring). The layer's decoding cache serves
    the attention and the mixer (``ParallelCache``)."""

    def __init__(self, cfg: HookedSSMConfig, layer: int, earlier: Sequence[nn.Module] = ()):
        super().__init__()
        self.layer_type = cfg.layer_types[layer]
        invocation = cfg.layer_types[:layer].count(HYBRID_KIND)
        self.shared_block = invocation % cfg.n_shared_blocks
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.shared_transformer = SharedTransformer(cfg)
        self.ln1 = RMSNorm(cfg.d_model, cfg.eps, cfg.norm_zero_centered)
        self.mixer = Mamba2Mixer(cfg)
        self.hook_mixer_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]
        source = next((block for block in earlier if isinstance(block, SharedTransformerMamba2Block)
                       and block.shared_block == self.shared_block), None)
        if source is not None:
            self.shared_transformer.tie_to(source.shared_transformer)
            # Loading with assign=True installs new Parameters per key: tie again once loaded (the
            # source, an earlier block, is loaded by then).
            self.register_load_state_dict_post_hook(
                lambda block, keys: block.shared_transformer.tie_to(source.shared_transformer)
            )

    def forward(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        cache: ParallelCache | None = None,
        attention_mask: Tensor | None = None,
        state_positions: Sequence[int] | None = None,
        *,
        embeddings: Float[Tensor, "batch pos d_model"],
    ) -> Float[Tensor, "batch pos d_model"]:
        resid = self.hook_resid_pre(resid)
        shared_out = self.shared_transformer(resid, embeddings, cache, attention_mask)
        mixed = self.hook_mixer_out(self.mixer(self.ln1(resid + shared_out), cache, attention_mask, state_positions))
        return self.hook_resid_post(resid + mixed)
