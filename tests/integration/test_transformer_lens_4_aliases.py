"""TransformerLens 4's SSM hook names (TransformerBridge's ``hook_ssm_*``) resolve to exactly the
tensor TransformerBridge means, or raise a KeyError naming our hook for it: code ported from
TransformerLens 4 never silently reads another tensor."""

import pytest
import torch

from hooked_ssm import HookedSSM, as_matrix

PREFIX = "blocks.1.mixer."


@pytest.fixture(scope="module", params=["toy-gdn", "toy-mamba2", "toy-rwkv7"])
def toy(request):
    model = HookedSSM.from_pretrained(request.param)
    tokens = torch.randint(3, model.cfg.d_vocab, (1, 9), generator=torch.Generator().manual_seed(0))
    return request.param, model, tokens


def test_hook_ssm_write_is_beta_on_a_delta_rule_and_an_error_elsewhere(toy):
    family, model, tokens = toy
    if family == "toy-gdn":
        _, cache = model.run_with_cache(tokens, names_filter=[PREFIX + "hook_ssm_write", PREFIX + "hook_k"])
        assert set(cache.keys()) == {PREFIX + "hook_beta", PREFIX + "hook_k"}
        assert cache[PREFIX + "hook_beta"].shape == (1, 9, model.cfg.n_heads)
        return
    with pytest.raises(KeyError, match=r"blocks\.1\.mixer\.hook_write.*as_matrix"):
        model.run_with_cache(tokens, names_filter=[PREFIX + "hook_ssm_write"])
    with pytest.raises(KeyError, match=r"hook_write"):
        model.add_hook(PREFIX + "hook_ssm_write", lambda act, hook: act)
    if family == "toy-mamba2":  # the hint's layout is TransformerLens 4's dt * (x outer B)
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith(PREFIX))
        d_k, d_v = model.cfg.d_k, model.cfg.d_v
        theirs = cache[PREFIX + "hook_dt"][..., None, None] * cache[PREFIX + "hook_x"][..., :, None] \
            * cache[PREFIX + "hook_k"][..., None, :]  # [batch, pos, head, head_dim, d_state]
        torch.testing.assert_close(as_matrix(cache[PREFIX + "hook_write"], d_k, d_v).mT, theirs)


def test_hook_ssm_decay_names_our_decay_hook(toy):
    _, model, tokens = toy
    with pytest.raises(KeyError, match=r"log decay.*blocks\.1\.mixer\.hook_decay"):
        model.run_with_hooks(tokens, fwd_hooks=[(PREFIX + "hook_ssm_decay", lambda act, hook: act)])


def test_same_tensor_aliases_resolve(toy):
    _, model, tokens = toy
    names = [PREFIX + "hook_ssm_state", PREFIX + "hook_ssm_B", PREFIX + "hook_ssm_C"]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    assert set(cache.keys()) == {PREFIX + "hook_state", PREFIX + "hook_k", PREFIX + "hook_q"}
