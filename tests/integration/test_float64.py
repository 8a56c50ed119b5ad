"""``dtype="float64"`` computes in float64 throughout: every toy family runs, and its chunked scan
equals its per-token recurrence to float64 precision (float32 agrees only to ~1e-5)."""

import pytest
import torch

from hooked_ssm import HookedSSM

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["toy-gdn", "toy-mamba2", "toy-rwkv7"])
def test_float64_chunked_equals_recurrent_to_float64_precision(name):
    tokens = torch.randint(3, 900, (2, 40), generator=torch.Generator().manual_seed(0))
    chunked = HookedSSM.from_pretrained(name, dtype="float64")
    recurrent = HookedSSM.from_pretrained(name, dtype="float64", execution="recurrent")
    with torch.no_grad():
        logits = chunked(tokens)
        assert logits.dtype == torch.float64
        torch.testing.assert_close(logits, recurrent(tokens), rtol=0, atol=1e-9)
        torch.testing.assert_close(logits, HookedSSM.from_pretrained(name)(tokens).double(), rtol=0, atol=1e-3)
