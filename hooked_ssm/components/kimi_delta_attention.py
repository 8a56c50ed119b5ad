"""Kimi Delta Attention (KDA: ``KimiLinearForCausalLM``, ``BailingHybridForCausalLM``): the gated delta
rule with a decay per key channel. Per head (key-major state ``S`` ``[d_k, d_v]``, ``A_t = diag(a_t)``,
``a_t`` in ``(0, 1]^{d_k}``)::

    S_t = (I - b_t k_t k_t^T) A_t S_{t-1} + b_t k_t v_t^T        hook_write = b_t k_t v_t^T
    o_t = S_t^T q_t                                              hook_read = o_t
    y_t = w * o_t / rms(o_t) * sigmoid(z_t)                      hook_z = y_t

with ``log a_t = -exp(A_log_h) softplus(W_a x + dt_bias)`` or, bounded (``cfg.kda_gate_lower_bound =
L``: BailingHybrid's safe gate), ``L sigmoid(exp(A_log_h) (W_a x + dt_bias))``; ``W_a`` and the
output gate's ``W_z`` low rank (``cfg.kda_gate_rank``: Kimi Linear) or full (BailingHybrid).

Everything else is Gated DeltaNet's (no grouped keys): the mixer is ``GatedDeltaNetMixer`` with these
parameters, run by the same scan (``hooked_ssm.ops.gated_delta_rule`` takes a per-channel decay),
with the same hooks and the same exact write and state edits; ``hook_decay`` is ``a_t``
``[batch, pos, head, d_k]``.
"""

from __future__ import annotations

from hooked_ssm.components.gated_deltanet import GatedDeltaNetMixer
from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.hook_names import HookDims


class KimiDeltaAttentionMixer(GatedDeltaNetMixer):
    HOOK_DIMS: HookDims = {**GatedDeltaNetMixer.HOOK_DIMS, "hook_decay": ("d_k",)}

    def __init__(self, cfg: HookedSSMConfig):
        super().__init__(
            cfg, per_channel_decay=True, gate_rank=cfg.kda_gate_rank, gate_lower_bound=cfg.kda_gate_lower_bound,
            norm_gate="sigmoid",
        )
