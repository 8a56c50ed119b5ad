"""The per-position quantities of the dashboard against their definitions, computed the slow way."""

import pytest
import torch

from writesae_lens.dashboard.data import DashboardConfig, atom_decay, in_state_after_writes, json_safe, write_projection


def test_write_projection_is_the_frobenius_product_with_the_materialised_write():
    torch.manual_seed(1)
    d_k, d_v = 5, 3
    factors = torch.randn(2, 4, d_k + d_v)  # [k | b v]
    u, w = torch.randn(6, d_k), torch.randn(6, d_v)
    got = write_projection(factors, u, w)
    for b in range(2):
        for t in range(4):
            write = torch.outer(factors[b, t, :d_k], factors[b, t, d_k:])
            for i in range(6):
                assert got[b, t, i] == pytest.approx(float((torch.outer(u[i], w[i]) * write).sum()), abs=1e-5)


@pytest.mark.parametrize("per_atom", [False, True])
def test_in_state_follows_the_forget_gate_product_since_the_last_write(per_atom):
    torch.manual_seed(2)
    batch, length, atoms, presence = 3, 30, 4, 0.5
    fires = torch.rand(batch, length, atoms) < 0.08
    decay = torch.rand(batch, length, atoms) * 0.3 + 0.7 if per_atom else torch.rand(batch, length) * 0.3 + 0.7
    got = in_state_after_writes(fires, decay, presence)
    for b in range(batch):
        for i in range(atoms):
            carried = 0.0  # G(last write -> t), per token
            for t in range(length):
                a_t = float(decay[b, t, i] if per_atom else decay[b, t])
                carried = 1.0 if fires[b, t, i] else carried * a_t
                assert bool(got[b, t, i]) == (carried >= presence), (b, i, t)


def test_atom_decay_is_the_decay_of_the_atom_along_u():
    torch.manual_seed(3)
    decay = torch.rand(2, 5, 6)  # RWKV-7: one decay per key channel
    u = torch.nn.functional.normalize(torch.randn(3, 6), dim=-1)
    got = atom_decay(decay, u)
    for i in range(3):  # u^T diag(w_t) u: the part of diag(w_t) u w^T that stays along u w^T
        assert got[1, 2, i] == pytest.approx(float(u[i] @ torch.diag(decay[1, 2]) @ u[i]), abs=1e-6)
    gate = torch.rand(2, 5)
    assert atom_decay(gate, u) is gate


def test_json_safe_and_config_checks():
    import numpy as np

    assert json_safe({"a": np.float32(1.5), "b": [float("nan"), np.int64(3)], 4: (np.inf,)}) == {"a": 1.5, "b": [None, 3], "4": [None]}
    with pytest.raises(ValueError, match="presence"):
        DashboardConfig(presence=0)
    with pytest.raises(ValueError, match="min_firings"):
        DashboardConfig(min_firings=0)
