"""``HookedSSM.forward(start_at_layer=..., stop_at_layer=...)``: running blocks ``[0, l)`` then
``[l, n)`` on the residual stream equals one full forward, also when continuing a
``RecurrentState`` (TransformerLens's convention)."""

import pytest
import torch

from hooked_ssm import HookedSSM
from hooked_ssm.state import RecurrentState


@pytest.fixture(scope="module")
def hybrid(qwen35):
    return HookedSSM.from_pretrained(qwen35[0])  # layers: lin, lin, full, lin, full


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_split_forward_equals_full_forward(hybrid, layer):
    tokens = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = hybrid(tokens)
        resid = hybrid(tokens, stop_at_layer=layer)
        logits = hybrid(resid, start_at_layer=layer)
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)


def test_resuming_a_state_from_a_layer(hybrid):
    """The caches of blocks >= l continue where a previous call left them; n_tokens advances once
    the run reaches the last block."""
    tokens = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    layer, n_blocks = 1, len(hybrid.blocks)
    with torch.no_grad():
        full = hybrid(tokens)
        resid = hybrid(tokens, stop_at_layer=layer)
        state = RecurrentState.empty(hybrid.cfg.layer_types)
        hybrid(resid[:, :7], start_at_layer=layer, stop_at_layer=n_blocks, past_state=state)
        assert state.n_tokens == 7
        rest = hybrid(resid[:, 7:], start_at_layer=layer, past_state=state)
    assert state.n_tokens == 12
    torch.testing.assert_close(rest, full[:, 7:], atol=1e-5, rtol=1e-5)


def test_start_at_layer_refuses_token_ids_and_loss(hybrid):
    tokens = torch.randint(3, 300, (1, 5))
    with pytest.raises(TypeError, match="residual stream"):
        hybrid(tokens, start_at_layer=2)
    with pytest.raises(ValueError, match="outside"):
        hybrid(tokens, start_at_layer=9)
    with torch.no_grad():
        resid = hybrid(tokens, stop_at_layer=2)
    with pytest.raises(ValueError, match="token ids"):
        hybrid(resid, start_at_layer=2, return_type="loss")


def test_rwkv7_needs_and_uses_v_first(tmp_path):
    from test_rwkv7_parity import make_blink_state_dict

    path = tmp_path / "rwkv7-tiny.pth"
    torch.save(make_blink_state_dict(seed=3), path)
    model = HookedSSM.from_pretrained(path, device="cpu")
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(2))
    captured = {}
    with torch.no_grad():
        full = model(tokens)
        with model.hooks(fwd_hooks=[("blocks.0.mixer.hook_v_first", lambda act, hook: captured.setdefault("v", act))]):
            resid = model(tokens, stop_at_layer=1)
        with pytest.raises(ValueError, match="v_first"):
            model(resid, start_at_layer=1)
        logits = model(resid, start_at_layer=1, v_first=captured["v"])
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)
