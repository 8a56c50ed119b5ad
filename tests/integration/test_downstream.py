"""Downstream cost against a hand-written loop: the SAE replaces one head through a plain forward
hook, and the teacher-forced loss is summed token by token."""

import math

import pytest
import torch

import writesae_lens.saes  # noqa: F401
from hooked_ssm import HookedSSM
from writesae_lens.downstream import downstream_cost, downstream_costs
from writesae_lens.saes import WriteSAE, WriteSAEConfig

LAYER, HEAD = 1, 2


@pytest.fixture(scope="module")
def model(qwen35):
    return HookedSSM.from_pretrained(qwen35[0])


def random_sae(model, site, seed):
    torch.manual_seed(seed)
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    sae = WriteSAE(WriteSAEConfig(d_in=d_k * d_v, d_sae=24, d_k=d_k, d_v=d_v, k=4))
    sae.cfg.metadata.hook_name = f"blocks.{LAYER}.mixer.hook_{site}"
    sae.cfg.metadata.hook_head_index = HEAD
    return sae


def hand_written_loss(model, sae, tokens, prefix):
    """Mean next-token loss over positions prefix.. with ``sae`` replacing its head (None: clean)."""

    def replace_head(act, hook=None):
        act = act.clone()
        act[:, :, HEAD] = sae(act[:, :, HEAD])
        return act

    hooks = [] if sae is None else [(sae.cfg.metadata.hook_name, replace_head)]
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    total, count = 0.0, 0
    for b in range(tokens.shape[0]):
        for t in range(prefix, tokens.shape[1]):
            row = logits[b, t - 1].double()
            total += -(row[tokens[b, t]] - torch.logsumexp(row, 0)).item()
            count += 1
    return total / count, count


@pytest.mark.parametrize("site", ["write", "state"])
def test_downstream_cost_equals_a_hand_written_loop(model, site):
    tokens = torch.randint(3, 300, (3, 24), generator=torch.Generator().manual_seed(5))
    sae = random_sae(model, site, seed=1)
    cost = downstream_cost(model, sae, tokens, prefix=10, batch_size=2, progress=False)
    spliced, n = hand_written_loss(model, sae, tokens, 10)
    clean, _ = hand_written_loss(model, None, tokens, 10)
    assert cost.n_tokens == n == 3 * 14
    assert cost.spliced_loss == pytest.approx(spliced, rel=1e-6)
    assert cost.clean_loss == pytest.approx(clean, rel=1e-6)
    assert cost.ppl_change == pytest.approx(math.exp(spliced - clean) - 1, rel=1e-5, abs=1e-9)
    assert abs(spliced - clean) > 1e-5  # the splice did change the forward pass


def test_one_clean_pass_serves_several_saes_and_bad_prefixes_are_refused(model):
    tokens = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(6))
    saes = [random_sae(model, "write", seed=2), random_sae(model, "state", seed=3)]
    costs = downstream_costs(model, saes, tokens, progress=False)
    assert [c.prefix for c in costs] == [8, 8] and costs[0].clean_loss == costs[1].clean_loss
    for sae, cost in zip(saes, costs):
        assert cost.spliced_loss == pytest.approx(downstream_cost(model, sae, tokens, progress=False).spliced_loss)
    with pytest.raises(ValueError, match="prefix"):
        downstream_cost(model, saes[0], tokens, prefix=16, progress=False)
