"""SAE splicing into HookedSSM (writesae_lens.splicing.HookedSAESSM) with stock SAELens SAEs.

References are hand-written hook functions run through plain ``run_with_hooks``: the spliced
model must give exactly what replacing the hooked tensor by hand gives.
"""

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata

from hooked_ssm import HookedSSM
from writesae_lens import HookedSAESSM, sae_site_name

WRITE = "blocks.0.mixer.hook_write"  # [batch, pos, 4 heads, d_k*d_v = 16*8]
STATE = "blocks.1.mixer.hook_state"
RESID = "blocks.0.hook_resid_post"
N_HEADS, D_WRITE, D_MODEL = 4, 128, 64


def make_sae(hook_name, head=None, d_in=D_WRITE, kind="topk", seed=0, scale=0.2):
    torch.manual_seed(seed)
    metadata = SAEMetadata(hook_name=hook_name, hook_head_index=head)
    if kind == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=96, k=12, metadata=metadata))
    else:
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=96, metadata=metadata))
    with torch.no_grad():  # random, non-trivial weights (the stock init has b_enc = b_dec = 0)
        for param in sae.parameters():
            param.normal_(0, scale)
    return sae


def reconstruct(sae, x):
    return sae.decode(sae.encode(x))


@pytest.fixture(scope="module")
def spliced(qwen35):
    return HookedSAESSM.from_pretrained(qwen35[0])


@pytest.fixture
def model(spliced):
    yield spliced
    spliced.reset_saes()
    spliced.reset_hooks(including_permanent=True)


@pytest.fixture(scope="module")
def tokens():
    gen = torch.Generator().manual_seed(0)
    toks = torch.randint(3, 300, (2, 12), generator=gen)
    toks[:, 0] = 1  # BOS
    toks[1, 6] = 2  # an EOS mid-sequence, for exclude_special_tokens
    return toks


@pytest.fixture(scope="module")
def clean_logits(spliced, tokens):
    with torch.no_grad():
        return spliced(tokens)


def replace_heads(saes_by_head):
    def hook(x, hook):
        x = x.clone()
        for head, sae in saes_by_head.items():
            x[:, :, head] = reconstruct(sae, x[:, :, head])
        return x

    return hook


def test_from_pretrained_and_from_hooked_ssm_build_the_subclass(qwen35, spliced, clean_logits, tokens):
    assert type(spliced) is HookedSAESSM and isinstance(spliced, HookedSSM)
    plain = HookedSSM.from_pretrained(qwen35[0])
    weight = plain.W_E
    converted = HookedSAESSM.from_hooked_ssm(plain)
    assert converted is plain and isinstance(converted, HookedSAESSM) and converted.W_E is weight
    assert HookedSAESSM.from_hooked_ssm(converted) is converted
    with torch.no_grad():
        assert torch.equal(converted(tokens), clean_logits)
        sae = make_sae(WRITE, head=2)
        assert torch.equal(converted.run_with_saes(tokens, saes=[sae], use_error_term=True), clean_logits)
    assert converted.acts_to_saes == {}


@pytest.mark.parametrize("kind", ["topk", "standard"])
def test_error_term_reproduces_the_clean_forward(model, tokens, clean_logits, kind):
    saes = [
        make_sae(WRITE, head=0, kind=kind, seed=1),
        make_sae(WRITE, head=3, kind=kind, seed=2),
        make_sae(STATE, head=2, kind=kind, seed=3),
        make_sae(RESID, d_in=D_MODEL, kind=kind, seed=4),
    ]
    with torch.no_grad():
        spliced = model.run_with_saes(tokens, saes=saes, use_error_term=True)
        without_error = model.run_with_saes(tokens, saes=saes)
        # Observing hook_state at all switches the mixer to its state-materialising scan, which
        # differs from the default chunked scan by float rounding (~1e-6): compare like with like.
        observed = model.run_with_hooks(tokens, fwd_hooks=[(STATE, lambda x, hook: None)])
        write_only = model.run_with_saes(tokens, saes=[saes[0], saes[1], saes[3]], use_error_term=True)
    assert (spliced - observed).abs().max().item() <= 1e-6
    assert (spliced - clean_logits).abs().max().item() <= 1e-5
    assert (write_only - clean_logits).abs().max().item() <= 1e-6  # in fact bit for bit
    assert (without_error - clean_logits).abs().max().item() > 1e-3  # the SAEs do change the model
    assert model.acts_to_saes == {}


def test_head_splice_replaces_only_that_head(model, tokens):
    sae = make_sae(WRITE, head=3)
    with torch.no_grad():
        expected = model.run_with_hooks(tokens, fwd_hooks=[(WRITE, replace_heads({3: sae}))])
        got = model.run_with_saes(tokens, saes=[sae])
        _, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
        _, clean_cache = model.run_with_cache(tokens, names_filter=[WRITE])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    site = f"{WRITE}.h3"
    assert sae_site_name(WRITE, 3) == site
    # The SAE sees [batch, pos, d_in] = head 3 of the native write.
    torch.testing.assert_close(cache[f"{site}.hook_sae_input"], clean_cache[WRITE][:, :, 3], rtol=0, atol=0)
    assert cache[f"{site}.hook_sae_acts_post"].shape == (2, 12, 96)
    assert cache[f"{site}.hook_sae_output"].shape == (2, 12, D_WRITE)


def test_saes_on_several_heads_of_one_hook(model, tokens):
    sae0, sae2 = make_sae(WRITE, head=0, seed=5), make_sae(WRITE, head=2, seed=6)
    model.add_sae(sae0)
    model.add_sae(sae2)
    assert set(model.acts_to_saes) == {f"{WRITE}.h0", f"{WRITE}.h2"}
    with torch.no_grad():
        got = model(tokens)
        model.reset_saes()
        expected = model.run_with_hooks(tokens, fwd_hooks=[(WRITE, replace_heads({0: sae0, 2: sae2}))])
        model.add_sae(sae0)
        model.add_sae(sae2)
        model.reset_saes(f"{WRITE}.h0")  # one site
        only_h2 = model(tokens)
        model.reset_saes()
        expected_h2 = model.run_with_hooks(tokens, fwd_hooks=[(WRITE, replace_heads({2: sae2}))])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(only_h2, expected_h2, rtol=0, atol=1e-6)
    assert model.acts_to_saes == {} and WRITE in model.hook_dict


def test_reset_restores_the_original_hook_point_with_its_permanent_hooks(model, tokens):
    original = model.hook_dict[WRITE]
    seen = []
    model.add_hook(WRITE, lambda x, hook: seen.append(x.shape), is_permanent=True)
    model.add_sae(make_sae(WRITE, head=1))
    assert WRITE not in model.hook_dict and f"{WRITE}.h1.hook_sae_acts_post" in model.hook_dict
    model.reset_saes(WRITE)  # by hook name: every SAE on the hook
    assert model.hook_dict[WRITE] is original
    with torch.no_grad():
        model(tokens)
    assert seen == [(2, 12, N_HEADS, D_WRITE)]


def test_saes_context_restores_what_it_displaced(model, tokens):
    head_sae = make_sae(WRITE, head=1, seed=7)
    headless = make_sae(WRITE, d_in=N_HEADS * D_WRITE, seed=8)  # all heads flattened
    model.add_sae(head_sae)
    with model.saes(saes=[headless]):
        assert set(model.acts_to_saes) == {WRITE}
    assert set(model.acts_to_saes) == {f"{WRITE}.h1"} and model.acts_to_saes[f"{WRITE}.h1"] is head_sae
    with model.saes(saes=[make_sae(WRITE, head=1, seed=9)]):
        assert model.acts_to_saes[f"{WRITE}.h1"] is not head_sae
    assert model.acts_to_saes[f"{WRITE}.h1"] is head_sae


def test_headless_sae_on_a_4d_hook_sees_all_heads_flattened(model, tokens):
    sae = make_sae(WRITE, d_in=N_HEADS * D_WRITE, kind="standard", seed=10)

    def by_hand(x, hook):
        return reconstruct(sae, x.flatten(2)).view(x.shape)

    with torch.no_grad():
        expected = model.run_with_hooks(tokens, fwd_hooks=[(WRITE, by_hand)])
        got = model.run_with_saes(tokens, saes=[sae])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_run_with_hooks_with_saes_reaches_the_features(model, tokens, clean_logits):
    sae = make_sae(WRITE, head=3, seed=11)
    ablate = [(f"{WRITE}.h3.hook_sae_acts_post", lambda acts, hook: torch.zeros_like(acts))]
    with torch.no_grad():
        sae.use_error_term = True
        with_error = model.run_with_hooks_with_saes(tokens, saes=[sae], fwd_hooks=ablate)
        sae.use_error_term = False

        def zero_head(x, hook):
            x = x.clone()
            x[:, :, 3] = sae.b_dec + (x[:, :, 3] - reconstruct(sae, x[:, :, 3]))
            return x

        expected = model.run_with_hooks(tokens, fwd_hooks=[(WRITE, zero_head)])
    # Zeroing every feature with the error term kept leaves b_dec + error at head 3.
    torch.testing.assert_close(with_error, expected, rtol=0, atol=1e-5)
    assert (with_error - clean_logits).abs().max().item() > 1e-4


def test_exclude_special_tokens(model, tokens):
    sae = make_sae(WRITE, head=0, seed=12)
    keep = (tokens == 1) | (tokens == 2)

    def by_hand(x, hook):
        x = x.clone()
        x[:, :, 0] = torch.where(keep[..., None], x[:, :, 0], reconstruct(sae, x[:, :, 0]))
        return x

    with torch.no_grad():
        expected = model.run_with_hooks(tokens, fwd_hooks=[(WRITE, by_hand)])
        got = model.run_with_saes(tokens, saes=[sae], exclude_special_tokens=[1, 2])
        one_sequence = model.run_with_saes(tokens[1], saes=[sae], exclude_special_tokens=[1, 2])  # [pos] input
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(one_sequence, expected[1:], rtol=0, atol=1e-5)


def test_generate_with_error_term_matches_clean_generate(model):
    prompt = torch.tensor([[1, 17, 42, 99]])
    clean = model.generate(prompt, max_new_tokens=3, do_sample=False, stop_at_eos=False, verbose=False)
    with model.saes(saes=[make_sae(WRITE, head=1), make_sae(STATE, head=0)], use_error_term=True):
        spliced = model.generate(prompt, max_new_tokens=3, do_sample=False, stop_at_eos=False, verbose=False)
    assert torch.equal(clean, spliced)


# ------------------------------------------------------------------------------------------ errors
def test_headless_sae_of_one_head_size_raises(model):
    with pytest.raises(ValueError, match=r"hook_head_index.*\(0\.\.3\)"):
        model.add_sae(make_sae(WRITE))  # d_in = 128 = one head, no head index
    assert model.acts_to_saes == {}


def test_wrong_d_in_names_both_shapes(model):
    with pytest.raises(ValueError, match=r"d_in=100.*\[batch, pos, 4, 128\].*d_in=128"):
        model.add_sae(make_sae(WRITE, head=0, d_in=100))


def test_head_index_out_of_range(model):
    with pytest.raises(ValueError, match=r"hook_head_index=4.*4 heads.*0\.\.3"):
        model.add_sae(make_sae(WRITE, head=4))


def test_unknown_hook_suggests_names(model):
    with pytest.raises(KeyError, match="Did you mean"):
        model.add_sae(make_sae("blocks.0.mixer.hook_writ", head=0))


def test_forward_time_checks_remove_the_saes_when_the_forward_raises(model, tokens):
    # blocks.2.attn.hook_z is [batch, pos, 4, 16]: not known statically, checked on the forward.
    hook_z = "blocks.2.attn.hook_z"
    original = model.hook_dict[hook_z]
    with pytest.raises(ValueError, match=r"4 heads.*0\.\.3"):
        model.run_with_saes(tokens, saes=[make_sae(hook_z, head=5, d_in=16)])
    with pytest.raises(ValueError, match=r"d_in=32.*\[2, 12, 4, 16\]"):
        model.run_with_saes(tokens, saes=[make_sae(WRITE, head=0), make_sae(hook_z, head=1, d_in=32)])
    assert model.acts_to_saes == {}
    assert model.hook_dict[hook_z] is original and WRITE in model.hook_dict
    with torch.no_grad():  # and the model is clean again
        assert torch.equal(model(tokens), model.run_with_hooks(tokens, fwd_hooks=[]))
