"""RWKV-7 ("x070", Goose): the time mix (the recurrent mixer) and the channel mix, every quantity of
the recurrence hooked, following BlinkDL's reference (``rwkv`` pip 0.8.32, ``RWKV_x070``).

Time mix of one layer, per head (key-major state ``S`` of shape ``[d_k, d_v]``; ``x`` is ``ln1`` of
the residual stream, ``x_prev`` the previous token's ``x``)::

    x_c   = x + (x_prev - x) * x_c_mix                  c in {r, w, k, v, a, g}  (token shift)
    r     = W_r x_r                                      hook_q
    w     = exp(-e^-0.5 sigmoid(w0 + tanh(x_w w1) w2))   hook_decay  [.., d_k]: per key channel, in (0.545, 1)
    a     = sigmoid(a0 + x_a a1 a2)                      hook_a      in-context learning rate
    kappa = normalize(W_k x_k * k_k) per head            hook_erase_key
    k~    = W_k x_k * (1 + (a - 1) * k_a)                hook_k      the write key
    v     = W_v x_v  (layer 0: v_first = v)              hook_v_first (layer 0)
    v     = lerp(v, v_first, sigmoid(v0 + x_v v1 v2))    layers >= 1; hook_v is the value used
    S_t   = diag(w) S - (a * kappa)(kappa^T S) + k~ v^T  hook_write = k~ v^T, hook_state = S_t
                                                         hook_write_factors = [k~ | v] (observation only)
    o     = S_t^T r                                      hook_read
    y     = (GroupNorm_heads(o) + (r . (k~ * r_k)) v) * g   the "bonus" term; g = sigmoid(x_g g1) g2 (hook_gate)
    out   = W_o y                                        hook_z = y

Semantics of edits:

- ``hook_write`` edits change the *state* only, exactly, at their positions, and persist into every
  later state. ``hook_state`` edits replace: the state that position ``t`` reads is exactly what the
  hook returned for ``t`` and the recurrence continues from it (``recurrent_mixer``). The bonus
  term ``(r . (k~ * r_k)) v`` is a direct path from the current token's ``k~`` and ``v`` that
  bypasses the state; it keeps using the unedited ``k~`` and ``v``.
  To move the bonus too, edit ``hook_k`` / ``hook_v`` (which move write and bonus together).
- ``v_first`` (the value residual): layer 0 produces it and ``blocks.0.mixer.hook_v_first`` is
  where it is produced; layer 0's own value *is* ``v_first``, so an edit there changes layer 0's
  write and bonus and every later layer's value mix. An edit of ``blocks.0.mixer.hook_v`` changes
  layer 0's write and bonus only (later layers still mix in the unedited ``v_first``). At a layer
  ``l >= 1``, ``hook_v_first`` is ``v_first`` as that layer reads it: an edit there changes that
  layer's value mix only.
- ``hook_a`` edits move both the erase strength and the write key (``k~`` is computed from ``a``);
  ``hook_erase_key`` edits move only the erase.

Execution: ``execution="chunked"`` (the default) runs the chunked form of
``hooked_ssm.ops.rwkv7_chunked`` (chunks of 16 tokens, batched matmuls; equal to the recurrence to
float32 rounding, values and gradients); ``"recurrent"`` runs the per-token loop. Write and state
edits split the chunked scan at the edited positions (``ops.split_scan``), so a clean run and an
edited run share every output before the first edit bit for bit. The recurrence runs for short
calls (decoding steps), for dense edits, and to produce the states a ``hook_state`` hook sees.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from hooked_ssm.components.norms import LayerNorm
from hooked_ssm.components.padding import fill_pads, real_tokens
from hooked_ssm.components.recurrent_mixer import (
    observe_write_factors,
    runs_recurrent,
    scan_with_state_hooks,
    write_edits,
)
from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.dtypes import at_least_fp32
from hooked_ssm.hook_names import MATRIX_STATE_HOOK_DIMS, HookDims
from hooked_ssm.ops.rwkv7 import recurrent_rwkv7
from hooked_ssm.ops.rwkv7_chunked import DEFAULT_CHUNK_SIZE, chunked_rwkv7
from hooked_ssm.ops.split_scan import scan_split_at_edits
from hooked_ssm.state import RWKV7Cache

DECAY_SCALE = math.exp(-0.5)  # BlinkDL's 0.606531 (rwkv pip rounds it; fla uses exp(-0.5) exactly)


class ValueResidual:
    """Carries layer 0's value (``v_first``) to the later layers during one forward call.

    One instance is shared by all RWKV-7 mixers of a model (a plain object, not a module)."""

    def __init__(self) -> None:
        self.value: Tensor | None = None


def token_shift(x: Float[Tensor, "batch pos d"], previous: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(x_{t-1} - x_t, x_last)``, with ``x_{-1}`` = ``previous`` (zeros at the start of a sequence)."""
    first = x.new_zeros(x.shape[0], 1, x.shape[-1]) if previous is None else previous[:, None].to(x.dtype)
    shifted = torch.cat([first, x[:, :-1]], dim=1)
    return shifted - x, x[:, -1]


class RWKV7Mixer(nn.Module):
    HOOK_DIMS: HookDims = {**MATRIX_STATE_HOOK_DIMS, "hook_decay": ("d_k",), "hook_a": ("d_k",),
                           "hook_erase_key": ("d_k",), "hook_v_first": ("d_v",), "hook_gate": ("d_v",)}

    def __init__(self, cfg: HookedSSMConfig, layer: int, value_residual: ValueResidual):
        super().__init__()
        self.layer, self.value_residual = layer, value_residual
        self.execution = cfg.execution
        self.n_heads, self.d_k, self.d_v = cfg.n_heads, cfg.d_k, cfg.d_v
        d, d_att = cfg.d_model, cfg.n_heads * cfg.d_k
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            setattr(self, name, nn.Parameter(torch.zeros(d)))
        self.w0 = nn.Parameter(torch.zeros(d_att))
        self.w1 = nn.Parameter(torch.zeros(d, cfg.rwkv_decay_lora))
        self.w2 = nn.Parameter(torch.zeros(cfg.rwkv_decay_lora, d_att))
        self.a0 = nn.Parameter(torch.zeros(d_att))
        self.a1 = nn.Parameter(torch.zeros(d, cfg.rwkv_a_lora))
        self.a2 = nn.Parameter(torch.zeros(cfg.rwkv_a_lora, d_att))
        if layer > 0:
            self.v0 = nn.Parameter(torch.zeros(d_att))
            self.v1 = nn.Parameter(torch.zeros(d, cfg.rwkv_v_lora))
            self.v2 = nn.Parameter(torch.zeros(cfg.rwkv_v_lora, d_att))
        self.g1 = nn.Parameter(torch.zeros(d, cfg.rwkv_gate_lora))
        self.g2 = nn.Parameter(torch.zeros(cfg.rwkv_gate_lora, d_att))
        self.k_k = nn.Parameter(torch.zeros(d_att))
        self.k_a = nn.Parameter(torch.zeros(d_att))
        self.r_k = nn.Parameter(torch.zeros(cfg.n_heads, cfg.d_k))
        self.r_proj = nn.Linear(d, d_att, bias=False)
        self.k_proj = nn.Linear(d, d_att, bias=False)
        self.v_proj = nn.Linear(d, d_att, bias=False)
        self.o_proj = nn.Linear(d_att, d, bias=False)
        self.ln_x_w = nn.Parameter(torch.ones(d_att))
        self.ln_x_b = nn.Parameter(torch.zeros(d_att))
        self.group_norm_eps = cfg.group_norm_eps

        self.hook_q = HookPoint()  # [batch, pos, head, d_k]: receptance r (the read query)
        self.hook_decay = HookPoint()  # [batch, pos, head, d_k]: per-channel decay w in (0, 1)
        self.hook_a = HookPoint()  # [batch, pos, head, d_k]: in-context learning rate a in (0, 1)
        self.hook_erase_key = HookPoint()  # [batch, pos, head, d_k]: kappa-hat, unit norm per head
        self.hook_k = HookPoint()  # [batch, pos, head, d_k]: write key k~
        self.hook_v_first = HookPoint()  # [batch, pos, head, d_v]: the value residual (see docstring)
        self.hook_v = HookPoint()  # [batch, pos, head, d_v]: write value (after the v_first mix)
        self.hook_gate = HookPoint()  # [batch, pos, head, d_v]: output gate g
        self.hook_write = HookPoint()  # [batch, pos, head, d_k*d_v]: k~ v^T, key-major
        self.hook_write_factors = HookPoint()  # [batch, pos, head, d_k+d_v]: [k~ | v], observation only
        self.hook_state = HookPoint()  # [batch, pos or selected pos, head, d_k*d_v]: S_t, key-major
        # hook_state edits replace: position t reads exactly the returned state and the recurrence goes on
        # from it (a returned S_t + E moves only t's read by E^T q_t). To make an edit persist, edit hook_write.
        self.hook_read = HookPoint()  # [batch, pos, head, d_v]: S_t^T r (before GroupNorm)
        self.hook_z = HookPoint()  # [batch, pos, head, d_v]: (GroupNorm(o) + bonus) * g, entering o_proj

    @property
    def W_O(self) -> Float[Tensor, "head d_v d_model"]:
        return self.o_proj.weight.T.reshape(self.n_heads, self.d_v, -1)

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.n_heads, -1))

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        cache: RWKV7Cache | None = None,
        attention_mask: Tensor | None = None,
        state_positions: Sequence[int] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        # Pads shift in zeros (as in fla) and are identity steps of the recurrence (v = 0: no write;
        # a = 0: no erase; w = 1: no decay), on either side of the row.
        real = real_tokens(attention_mask, x.shape[1])
        x = fill_pads(x, real)
        batch, length, _ = x.shape
        delta, last = token_shift(x, None if cache is None else cache.mixer_shift)
        xr, xw, xk, xv, xa, xg = (x + delta * mix for mix in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))

        r = self.hook_q(self._heads(self.r_proj(xr)))
        w_logit = self.w0 + torch.tanh(xw @ self.w1) @ self.w2
        w = self.hook_decay(fill_pads(self._heads(torch.exp(-DECAY_SCALE * torch.sigmoid(at_least_fp32(w_logit)))), real, 1.0))
        a = self.hook_a(fill_pads(self._heads(torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)), real))
        g = self.hook_gate(self._heads(torch.sigmoid(xg @ self.g1) @ self.g2))
        k = self._heads(self.k_proj(xk))
        kappa = self.hook_erase_key(F.normalize(k * self._heads(self.k_k), dim=-1, p=2.0))
        k = self.hook_k(k * (1 + (a - 1) * self._heads(self.k_a)))
        v = self._heads(self.v_proj(xv))
        if self.layer == 0:
            v = self.hook_v_first(v)
            self.value_residual.value = v
        else:
            v_first = self.value_residual.value
            if v_first is None:
                raise RuntimeError("RWKV-7 layers >= 1 need v_first from layer 0: run the blocks in order from 0.")
            v_first = self.hook_v_first(v_first)
            v = torch.lerp(v, v_first, self._heads(torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)))
        v = self.hook_v(fill_pads(v, real))

        observe_write_factors(self.hook_write_factors, lambda: (at_least_fp32(k), at_least_fp32(v)))
        initial_state = None if cache is None else cache.ssm_state
        o, final_state = self._scan(at_least_fp32(r), at_least_fp32(w), at_least_fp32(k), at_least_fp32(v), at_least_fp32(kappa), at_least_fp32(a),
                                    initial_state, state_positions)
        if cache is not None:
            cache.mixer_shift, cache.ssm_state = last, final_state

        o = self.hook_read(o.to(x.dtype))
        normed = F.group_norm(o.reshape(-1, self.n_heads * self.d_v), self.n_heads, self.ln_x_w, self.ln_x_b,
                              self.group_norm_eps).view(o.shape)
        bonus = (r * k * self.r_k).sum(dim=-1, keepdim=True) * v
        y = self.hook_z((normed + bonus.to(normed.dtype)) * g)
        return self.o_proj(y.flatten(-2))

    def _scan(self, r, w, k, v, kappa, a, initial_state, state_positions):
        """Run the recurrence: hook_write edits persist, hook_state returns replace (recurrent_mixer)."""
        native_write = lambda: (k[..., :, None] * v[..., None, :]).flatten(-2)  # noqa: E731
        edits = write_edits(self.hook_write, native_write, self.d_k, self.d_v)

        def scan(segment, state, edits, positions):
            inputs = tuple(x[:, segment] for x in (r, w, k, v, kappa, a))
            if positions or runs_recurrent(self.execution, segment.stop - segment.start, r.device):
                # states at chosen positions: only the recurrence yields them
                return recurrent_rwkv7(*inputs, state, edits, positions)

            def chunked(part, part_state, _positions):
                return (*chunked_rwkv7(*(x[:, part] for x in inputs), part_state), None)

            exact = lambda: recurrent_rwkv7(*inputs, state, edits, None)  # noqa: E731
            return scan_split_at_edits(chunked, exact, inputs[0], state, edits, None, DEFAULT_CHUNK_SIZE)

        return scan_with_state_hooks(self.hook_state, scan, r, initial_state, edits, state_positions)


class RWKV7ChannelMix(nn.Module):
    """``value(relu(key(x + (x_prev - x) * x_k))^2)``: RWKV-7's feed-forward, with token shift."""

    def __init__(self, cfg: HookedSSMConfig):
        super().__init__()
        self.x_k = nn.Parameter(torch.zeros(cfg.d_model))
        self.key = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.value = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]: key pre-activation
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]: relu(pre)^2

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        cache: RWKV7Cache | None = None,
        attention_mask: Tensor | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        x = fill_pads(x, real_tokens(attention_mask, x.shape[1]))
        delta, last = token_shift(x, None if cache is None else cache.mlp_shift)
        if cache is not None:
            cache.mlp_shift = last
        pre = self.hook_pre(self.key(x + delta * self.x_k))
        return self.value(self.hook_post(torch.relu(pre) ** 2))


class RWKV7Block(nn.Module):
    """RWKV-7 block: ``x += time_mix(ln1(x))``, ``x += channel_mix(ln2(x))``; layer 0 applies ``ln0``
    to the embedding first, so ``blocks.0.hook_resid_pre`` is ``ln0(embed)``."""

    def __init__(self, cfg: HookedSSMConfig, layer: int, earlier: Sequence[nn.Module] = ()):
        super().__init__()
        if set(cfg.layer_types) != {"rwkv7"}:
            raise ValueError(f"RWKV-7 layers cannot be mixed with other layer types; got {sorted(set(cfg.layer_types))}.")
        self.layer_type = cfg.layer_types[layer]
        # Layer 0 produces v_first; every later layer reads it through the same carrier.
        value_residual = earlier[0].mixer.value_residual if layer > 0 else ValueResidual()
        if layer == 0:
            self.ln0 = LayerNorm(cfg.d_model, cfg.eps)
        self.ln1 = LayerNorm(cfg.d_model, cfg.eps)
        self.ln2 = LayerNorm(cfg.d_model, cfg.eps)
        self.mixer = RWKV7Mixer(cfg, layer, value_residual)
        self.mlp = RWKV7ChannelMix(cfg)
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_mixer_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def forward(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        cache: RWKV7Cache | None = None,
        attention_mask: Tensor | None = None,
        state_positions: Sequence[int] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        if hasattr(self, "ln0"):
            resid = self.ln0(resid)
        resid = self.hook_resid_pre(resid)
        mixed = self.hook_mixer_out(self.mixer(self.ln1(resid), cache, attention_mask, state_positions))
        resid = self.hook_resid_mid(resid + mixed)
        resid = resid + self.hook_mlp_out(self.mlp(self.ln2(resid), cache, attention_mask))
        return self.hook_resid_post(resid)
