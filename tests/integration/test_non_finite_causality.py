"""A NaN or an infinity written at position t never reaches positions before t, on any execution
path: the chunked scans (which would spread it through ``0 * nan`` in their chunk matmuls), the
exact-edit paths split at edited positions, the recurrent form and full attention. The reference
for positions before t is the clean run."""

import pytest
import torch

from hooked_ssm import HookedSSM

pytestmark = pytest.mark.usefixtures("one_thread")

T, LENGTH = 40, 70  # t shares its chunk with earlier positions
T_ATTN = 20


@pytest.fixture(scope="module", params=["toy-gdn", "toy-mamba2", "toy-rwkv7"])
def name(request):
    return request.param


def poison(value, t=T):
    def hook(act, hook):
        act = act.clone()
        act[:, t] = value
        return act

    return hook


CASES = [  # (hook leaf, value, execution): every leaf on the chunked path, plus inf and the recurrent form
    *[(leaf, float("nan"), "chunked") for leaf in ("hook_v", "hook_k", "hook_decay", "hook_write", "hook_state")],
    ("hook_v", float("inf"), "chunked"),
    ("hook_v", float("nan"), "recurrent"),
]


@pytest.mark.parametrize("leaf, value, execution", CASES)
def test_non_finite_at_t_leaves_earlier_positions_alone(name, leaf, value, execution):
    toy = HookedSSM.from_pretrained(name, execution=execution)
    tokens = torch.randint(3, toy.cfg.d_vocab, (2, LENGTH), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean = toy(tokens)
        poisoned = toy.run_with_hooks(tokens, fwd_hooks=[(f"blocks.1.mixer.{leaf}", poison(value))])
    torch.testing.assert_close(poisoned[:, :T], clean[:, :T], atol=1e-4, rtol=1e-4)
    assert not torch.isfinite(poisoned[:, T:]).all()  # it does reach t and later


def test_attention_keeps_a_non_finite_key_out_of_earlier_queries(qwen35):
    model = HookedSSM.from_pretrained(qwen35[0])  # the tiny Qwen3.5: layer 2 is full attention
    assert model.cfg.layer_types[2] == "full_attention"
    tokens = torch.randint(3, model.cfg.d_vocab, (1, 30), generator=torch.Generator().manual_seed(1))
    for leaf in ("hook_k", "hook_v"):
        with torch.no_grad():
            clean = model(tokens)
            for names in ([], ["blocks.2.attn.hook_pattern"]):  # fused and hooked attention
                caching = [(name, lambda act, hook: None) for name in names]
                hooks = [(f"blocks.2.attn.{leaf}", poison(float("nan"), T_ATTN)), *caching]
                poisoned = model.run_with_hooks(tokens, fwd_hooks=hooks)
                torch.testing.assert_close(poisoned[:, :T_ATTN], clean[:, :T_ATTN])
                assert not torch.isfinite(poisoned[:, T_ATTN:]).all()
