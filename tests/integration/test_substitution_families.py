"""The substitution test's fast path equals naive full re-runs on the other recurrent families too,
and its deletion condition equals running with that write set to zero."""

import pytest
import torch

import writesae_lens.saes  # noqa: F401  (registers the architectures)
from hooked_ssm import HookedSSM
from writesae_lens.interventions import run_substitution_test
from writesae_lens.saes import WriteSAE, WriteSAEConfig


# Many tiny forwards: on a shared CPU one thread is far faster (fixture in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def random_sae(model, layer, head, site="write", seed=0):
    torch.manual_seed(seed)
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    cfg = WriteSAEConfig(d_in=d_k * d_v, d_sae=24, d_k=d_k, d_v=d_v, k=4)
    cfg.metadata.hook_name = f"blocks.{layer}.mixer.hook_{site}"
    cfg.metadata.hook_head_index = head
    return WriteSAE(cfg)


@pytest.mark.parametrize("site", ["write", "state"])
def test_mamba2_fast_path_equals_naive(site):
    model = HookedSSM.from_pretrained("toy-mamba2", device="cpu")
    tokens = torch.randint(3, model.cfg.d_vocab, (2, 20), generator=torch.Generator().manual_seed(0))
    sae = random_sae(model, layer=1, head=3, site=site)
    kwargs = dict(tokens=tokens, max_firings=10, progress=False, max_rows=9, min_firings_per_atom=1)
    fast, _ = run_substitution_test(model, sae, **kwargs)
    naive, _ = run_substitution_test(model, sae, method="naive", **kwargs)
    assert len(fast) == len(naive) == 10
    for a, b in zip(fast, naive):
        for key in ("kl_atom", "kl_delete", "kl_random"):
            assert abs(a[key] - b[key]) <= 1e-6, (key, a[key], b[key])

    # Deletion is the run with that write zeroed.
    row = fast[0]
    t, prompt = row["position"], row["prompt"]

    def zero(write, hook):
        write[:, t, 3] = 0.0
        return write

    with torch.no_grad():
        base = torch.log_softmax(model(tokens[prompt : prompt + 1])[0, -1], -1)
        deleted = torch.log_softmax(
            model.run_with_hooks(tokens[prompt : prompt + 1], fwd_hooks=[("blocks.1.mixer.hook_write", zero)])[0, -1], -1
        )
    kl = (deleted.exp() * (deleted - base)).sum().item()
    assert abs(kl - row["kl_delete"]) <= 1e-6


def test_rwkv7_fast_path_equals_naive(tmp_path):
    # The random BlinkDL-layout state dict of the RWKV-7 parity tests (same directory, on sys.path).
    from test_rwkv7_parity import make_blink_state_dict

    path = tmp_path / "rwkv7-tiny.pth"
    torch.save(make_blink_state_dict(seed=3), path)
    model = HookedSSM.from_pretrained(path, device="cpu")
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 16), generator=torch.Generator().manual_seed(1))
    sae = random_sae(model, layer=1, head=1)
    kwargs = dict(tokens=tokens, max_firings=8, progress=False, max_rows=9, min_firings_per_atom=1)
    fast, _ = run_substitution_test(model, sae, **kwargs)
    naive, _ = run_substitution_test(model, sae, method="naive", **kwargs)
    assert len(fast) == len(naive) == 8
    for a, b in zip(fast, naive):
        for key in ("kl_atom", "kl_delete", "kl_random"):
            # float32 round-off moves this random model's KLs (up to ~3 nats) by ~4e-6 relative.
            assert abs(a[key] - b[key]) <= 1e-6 + 3e-5 * abs(b[key]), (key, a[key], b[key])
