"""``blocks.{l}.mixer.hook_write_factors``: ``[k_w | v_w]`` with ``k_w v_w^T == hook_write`` on every
recurrent family, observation-only (caching it changes nothing, editing it raises), and refused by
SAE splicing with a pointer to the ``hook_write`` form."""

import pytest
import torch

import writesae_lens.saes  # noqa: F401  (registers the architectures)
from hooked_ssm import HookedSSM
from writesae_lens.saes import WriteSAE, WriteSAEConfig
from writesae_lens.splicing import HookedSAESSM


@pytest.fixture(scope="module", params=["gated_deltanet", "mamba2", "rwkv7"])
def family_model(request, qwen35, tmp_path_factory):
    if request.param == "gated_deltanet":
        return HookedSSM.from_pretrained(qwen35[0])
    if request.param == "mamba2":
        return HookedSSM.from_pretrained("toy-mamba2", device="cpu")
    # The random BlinkDL-layout state dict of the RWKV-7 parity tests (same directory, on sys.path).
    from test_rwkv7_parity import make_blink_state_dict

    path = tmp_path_factory.mktemp("rwkv7_factors") / "rwkv7-tiny.pth"
    torch.save(make_blink_state_dict(seed=5), path)
    return HookedSSM.from_pretrained(path, device="cpu")


def recurrent_layers(model):
    return [l for l in range(model.cfg.n_layers) if f"blocks.{l}.mixer.hook_write_factors" in model.hook_dict]


def tokens_for(model, batch=2, length=19):
    return torch.randint(3, min(model.cfg.d_vocab, 300), (batch, length), generator=torch.Generator().manual_seed(0))


def test_outer_product_of_the_factors_is_the_write(family_model):
    model, tokens = family_model, tokens_for(family_model)
    layers = recurrent_layers(model)
    assert layers, "no recurrent layer exposes hook_write_factors"
    names = [f"blocks.{l}.mixer.hook_write{suffix}" for l in layers for suffix in ("", "_factors")]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    for l in layers:
        factors, write = cache[f"blocks.{l}.mixer.hook_write_factors"], cache[f"blocks.{l}.mixer.hook_write"]
        assert factors.shape == (*write.shape[:3], d_k + d_v)
        k, v = factors[..., :d_k], factors[..., d_k:]
        outer = (k[..., :, None] * v[..., None, :]).flatten(-2)
        # Gated DeltaNet multiplies b_t into the other factor than hook_write does: one rounding apart.
        torch.testing.assert_close(outer, write, rtol=1e-6, atol=1e-7 * write.abs().max().item())
        assert write.abs().max() > 0


def test_factors_are_the_hooked_key_and_value(qwen35):
    """Gated DeltaNet: k_w = hook_k (the unit key), v_w = b_t * hook_v."""
    model = HookedSSM.from_pretrained(qwen35[0])
    prefix = "blocks.0.mixer."
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens_for(model), names_filter=lambda n: n.startswith(prefix))
    factors = cache[prefix + "hook_write_factors"]
    torch.testing.assert_close(factors[..., : model.cfg.d_k], cache[prefix + "hook_k"], rtol=0, atol=0)
    torch.testing.assert_close(
        factors[..., model.cfg.d_k :], cache[prefix + "hook_beta"][..., None] * cache[prefix + "hook_v"], rtol=0, atol=0
    )


def test_caching_the_factors_changes_nothing(family_model):
    model, tokens = family_model, tokens_for(family_model)
    names = [f"blocks.{l}.mixer.hook_write_factors" for l in recurrent_layers(model)]
    with torch.no_grad():
        clean = model(tokens)
        cached, _ = model.run_with_cache(tokens, names_filter=names)
    assert torch.equal(cached, clean)


@pytest.mark.parametrize("style", ["returned", "in_place"])
def test_editing_the_factors_is_a_clear_error(family_model, style):
    model, tokens = family_model, tokens_for(family_model)
    name = f"blocks.{recurrent_layers(model)[0]}.mixer.hook_write_factors"

    def edit(factors, hook):
        if style == "in_place":
            factors.mul_(2.0)
            return None
        return factors * 2.0

    with pytest.raises(ValueError, match=r"hook_write_factors is observation-only.*hook_write"):
        model.run_with_hooks(tokens, fwd_hooks=[(name, edit)])
    model.reset_hooks()


def test_splicing_a_factor_sae_points_to_the_write_form(qwen35):
    model = HookedSAESSM.from_hooked_ssm(HookedSSM.from_pretrained(qwen35[0]))
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    cfg = WriteSAEConfig(d_in=d_k + d_v, d_sae=16, d_k=d_k, d_v=d_v, k=4, input_kind="write_factors", write_scale=3.0)
    cfg.metadata.hook_name, cfg.metadata.hook_head_index = "blocks.0.mixer.hook_write_factors", 1
    sae = WriteSAE(cfg)
    with pytest.raises(ValueError, match=r"observation-only.*to_write_site"):
        model.add_sae(sae)
    site = sae.to_write_site()
    assert site.cfg.metadata.hook_name == "blocks.0.mixer.hook_write" and site.cfg.d_in == d_k * d_v
    model.add_sae(site)
    with torch.no_grad():
        assert torch.isfinite(model(tokens_for(model))).all()
    model.reset_saes()
