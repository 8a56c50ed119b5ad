"""WriteSAE on write factors ``[k | v]``: every quantity of a training step equals the materialised
computation on ``vec(write_scale * k v^T)`` (float64, so TopK ties cannot flip), the Gram identities
against brute force, conversion to the ``hook_write`` SAE, configuration errors, and saving."""

import json
from pathlib import Path

import pytest
import torch
from sae_lens import SAE, TrainingSAE
from sae_lens.saes.sae import TrainStepInput

from writesae_lens.saes import (
    ARCHITECTURES,
    WriteSAE,
    WriteTrainingSAE,
    WriteTrainingSAEConfig,
)
from writesae_lens.saes.factored import (
    atom_dot_matrix,
    cheapest_strategy,
    dense_rank1_squared_error,
    sparse_rank1_squared_error,
)

F64 = dict(dtype=torch.float64)


def brute_force_error(k, v, codes, u, w, bias):
    """||k v^T - sum_i c_i u_i w_i^T - B||^2 with every matrix built explicitly."""
    x = torch.einsum("bi,bj->bij", k, v)
    recon = torch.einsum("bs,si,sj->bij", codes, u, w)
    return (x - recon - bias).pow(2).sum(dim=(-1, -2))


@pytest.mark.parametrize("strategy", ["gram", "materialise"])
def test_sparse_error_equals_brute_force_even_with_repeated_atoms(strategy):
    gen = torch.Generator().manual_seed(0)
    batch, d_sae, d_k, d_v, n = 7, 20, 6, 5, 4
    k, v = torch.randn(batch, d_k, generator=gen, **F64), torch.randn(batch, d_v, generator=gen, **F64)
    u, w = torch.randn(d_sae, d_k, generator=gen, **F64), torch.randn(d_sae, d_v, generator=gen, **F64)
    bias = torch.randn(d_k, d_v, generator=gen, **F64)
    index = torch.randint(0, d_sae, (batch, n), generator=gen)
    index[:, 1] = index[:, 0]  # the aux loss concatenates live and dead atoms, which may overlap
    values = torch.randn(batch, n, generator=gen, **F64)
    codes = torch.zeros(batch, d_sae, **F64).scatter_add(-1, index, values)
    adb = atom_dot_matrix(u, w, bias)
    got = sparse_rank1_squared_error(k, v, values, u[index], w[index], bias, adb[index], strategy)
    torch.testing.assert_close(got, brute_force_error(k, v, codes, u, w, bias))
    torch.testing.assert_close(dense_rank1_squared_error(k, v, codes, u, w, bias, adb), brute_force_error(k, v, codes, u, w, bias))


def test_cheapest_strategy_picks_the_active_atom_gram_at_real_sizes():
    assert cheapest_strategy(256, 32, 128, 128, 2048) == "gram"  # TopK k = 32: 67M vs 134M vs 2.1G MACs
    assert cheapest_strategy(256, 288, 128, 128, 2048) == "materialise"  # k + k_aux atoms per row
    assert cheapest_strategy(256, 64, 128, 128, 64) == "dense"  # every atom active: one shared Gram


def pair(sparsity, rescale, d_k, d_v, d_sae=24, k=4, scale=2.7, tied=False):
    """A materialised-input SAE and a factor-input SAE with the same weights, centring and scale."""
    torch.manual_seed(0)
    common = dict(d_sae=d_sae, d_k=d_k, d_v=d_v, k=k, sparsity=sparsity, dtype="float64", tied=tied)
    if not tied:
        common["rescale_acts_by_decoder_norm"] = rescale
    matrix = WriteTrainingSAE(WriteTrainingSAEConfig(d_in=d_k * d_v, **common))
    with torch.no_grad():
        matrix.U_dec.mul_(torch.rand(d_sae, 1, **F64) + 0.5)  # atoms of various norms
        matrix.b_enc.normal_()
    matrix.set_input_mean(0.3 * scale * torch.randn(d_k * d_v, **F64))
    factors = WriteTrainingSAE(WriteTrainingSAEConfig(
        d_in=d_k + d_v, input_kind="write_factors", normalize_activations="none",
        write_scale=None if tied else scale, **common,
    ))
    factors.load_state_dict(matrix.state_dict())
    factors.cfg.apply_b_dec_to_input = True
    return matrix, factors, 1.0 if tied else scale


def step(sae, sae_in, dead, logging=True):
    sae.zero_grad()
    out = sae.training_forward_pass(
        TrainStepInput(sae_in=sae_in, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=logging)
    )
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}


# (d_k, d_v, k): the first shape scores a row through per-row Gram blocks, the second by building
# the reconstruction of its few active atoms; the aux loss (k + k_aux atoms) takes the other way.
SHAPES = [(16, 16, 2), (6, 5, 4)]


@pytest.mark.parametrize("d_k,d_v,k", SHAPES)
@pytest.mark.parametrize("sparsity", ["topk", "batchtopk"])
@pytest.mark.parametrize("rescale", [True, False])
def test_training_step_on_factors_equals_the_materialised_step(d_k, d_v, k, sparsity, rescale):
    matrix, factors, scale = pair(sparsity, rescale, d_k, d_v, k=k)
    gen = torch.Generator().manual_seed(1)
    kk, vv = torch.randn(40, d_k, generator=gen, **F64), torch.randn(40, d_v, generator=gen, **F64)
    write = torch.einsum("bi,bj->bij", kk, vv).flatten(1)
    dead = torch.rand(24, generator=gen) < 0.5
    expected, expected_grads = step(matrix, scale * write, dead)
    got, grads = step(factors, torch.cat([kk, vv], dim=-1), dead)
    assert set(got.losses) == set(expected.losses) == {"mse_loss", "auxiliary_reconstruction_loss"}
    assert expected.losses["auxiliary_reconstruction_loss"] > 0
    for name in expected.losses:
        torch.testing.assert_close(got.losses[name], expected.losses[name], rtol=1e-10, atol=0)
    torch.testing.assert_close(got.feature_acts, expected.feature_acts)
    torch.testing.assert_close(got.hidden_pre, expected.hidden_pre)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-9, atol=1e-12)
    # Logging steps carry the materialised input and output (SAELens's wandb metrics); others do not.
    torch.testing.assert_close(got.sae_in, expected.sae_in)
    torch.testing.assert_close(got.sae_out, expected.sae_out)
    if sparsity == "batchtopk":
        torch.testing.assert_close(factors.topk_threshold, matrix.topk_threshold)
    assert step(factors, torch.cat([kk, vv], dim=-1), dead, logging=False)[0].sae_out.numel() == 0


@pytest.mark.parametrize("sparsity", ["topk", "batchtopk"])
def test_write_site_form_and_saved_model_read_raw_writes(sparsity, tmp_path):
    matrix, factors, scale = pair(sparsity, True, 6, 5)
    gen = torch.Generator().manual_seed(2)
    kk, vv = torch.randn(30, 6, generator=gen, **F64), torch.randn(30, 5, generator=gen, **F64)
    write = torch.einsum("bi,bj->bij", kk, vv).flatten(1)
    factors.cfg.metadata.hook_name, factors.cfg.metadata.hook_head_index = "blocks.3.mixer.hook_write_factors", 2
    with torch.no_grad():
        expected = matrix(scale * write) / scale  # the materialised SAE, its scale folded out
        torch.testing.assert_close(factors(torch.cat([kk, vv], -1)), expected)  # factors in, raw write out
        site = factors.to_write_site()
        assert site.cfg.input_kind == "matrix" and site.cfg.d_in == 30 and site.cfg.write_scale is None
        assert site.cfg.metadata.hook_name == "blocks.3.mixer.hook_write" and site.cfg.metadata.hook_head_index == 2
        assert site.cfg.metadata.write_factors_training == {"hook_name": "blocks.3.mixer.hook_write_factors", "write_scale": scale}
        torch.testing.assert_close(site(write), expected)

        factors.save_inference_model(tmp_path / "final")
        loaded = SAE.load_from_disk(tmp_path / "final")
        assert type(loaded) is WriteSAE and loaded.cfg.d_in == 30 and loaded.cfg.metadata.hook_name.endswith("hook_write")
        if sparsity == "topk":  # BatchTopK's inference form thresholds instead, by design
            torch.testing.assert_close(loaded(write), expected)
        assert (torch.linalg.matrix_rank(loaded.W_dec.view(-1, 6, 5)) == 1).all()


@pytest.mark.parametrize("sparsity", ["topk", "batchtopk"])
def test_factor_checkpoint_loads_with_the_weights_it_had(sparsity, tmp_path):
    _, factors, _ = pair(sparsity, True, 6, 5)
    if sparsity == "batchtopk":  # saved as topk_threshold; the inference class calls it threshold
        factors.topk_threshold = torch.tensor(0.25, dtype=torch.double)
    factors.save_model(tmp_path)  # what SAELens's trainer writes into a checkpoint folder
    assert json.loads((tmp_path / "cfg.json").read_text())["write_scale"] == factors.cfg.write_scale
    for cls in (SAE, TrainingSAE):
        loaded = cls.load_from_disk(tmp_path, dtype="float64")
        assert loaded.reads_write_factors and loaded.cfg.write_scale == factors.cfg.write_scale
        state = loaded.state_dict()
        for name, value in factors.state_dict().items():
            torch.testing.assert_close(state.get(name, state.get("threshold")), value, rtol=0, atol=0)


def test_unresolved_auto_scale_is_a_clear_error():
    cfg = WriteTrainingSAEConfig(d_in=11, d_sae=8, d_k=6, d_v=5, k=2, input_kind="write_factors",
                                 normalize_activations="none", write_scale="auto")
    with pytest.raises(RuntimeError, match="write_scale is 'auto'.*build_runner"):
        WriteTrainingSAE(cfg).encode(torch.randn(3, 11))


def test_configuration_errors_name_the_fix():
    factor = dict(d_in=11, d_sae=8, d_k=6, d_v=5, input_kind="write_factors", normalize_activations="none")
    for arch in ("writesae_matrix", "writesae_bilinear"):
        with pytest.raises(ValueError, match="input_kind='write_factors' needs.*'writesae'"):
            ARCHITECTURES[arch][3](**factor)
    with pytest.raises(ValueError, match=r"d_in \(30\) must equal d_k \+ d_v"):
        WriteTrainingSAEConfig(**{**factor, "d_in": 30})
    with pytest.raises(ValueError, match="scales the write k v\\^T by s\\^2.*write_scale='auto'"):
        WriteTrainingSAEConfig(**{**factor, "normalize_activations": "expected_average_only_in"})
    with pytest.raises(ValueError, match="tied=True cannot use a write_scale"):
        WriteTrainingSAEConfig(**factor, tied=True, write_scale=2.0)
    with pytest.raises(ValueError, match="write_scale applies to input_kind='write_factors' only"):
        WriteTrainingSAEConfig(d_in=30, d_sae=8, d_k=6, d_v=5, write_scale=2.0)
    with pytest.raises(ValueError, match="positive finite"):
        WriteTrainingSAEConfig(**factor, write_scale=-1.0)
    with pytest.raises(ValueError, match="last dim d_k \\+ d_v = 11"):
        WriteTrainingSAE(WriteTrainingSAEConfig(**factor)).encode(torch.randn(2, 30))


def test_an_interrupted_save_keeps_the_previous_files(tmp_path, monkeypatch):
    """A crash while the weights file is being written leaves the earlier save intact, no truncated file."""
    import sae_lens.saes.sae as sae_module

    _, factors, _ = pair("topk", True, 6, 5)
    factors.save_model(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_save_file = sae_module.save_file

    def crash_midway(tensors, filename, *args, **kwargs):
        real_save_file(tensors, filename, *args, **kwargs)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(sae_module, "save_file", crash_midway)
    with torch.no_grad():
        factors.U_dec.mul_(2.0)
    with pytest.raises(OSError, match="simulated"):
        factors.save_model(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no leftovers, nothing truncated
