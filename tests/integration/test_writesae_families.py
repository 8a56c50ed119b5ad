"""WriteSAE on every family of the table: a tiny WriteSAE trained through SAELens's runner on the
family's write site (factored, as ``writesae`` trains by default), reloaded from disk, spliced, and
put through the substitution test, whose fast path must equal naive re-runs. So nothing in
``writesae_lens`` assumes one family.

The tiny models are the parity tests' own (``HYBRIDS`` of test_mamba2_hybrids, ``VARIANTS`` of
test_gdn_variants, test_minimax's, test_xlstm's, ``HYBRIDS`` of test_kda_hybrids), each with its recurrent
layer at index 2 (Zamba2: a hybrid layer, so the substitution test's runs from layer 2 on carry the
token embeddings).
"""

from __future__ import annotations

import math

import pytest
import torch
from sae_lens import SAE
from test_gdn_variants import VARIANTS
from test_kda_hybrids import HYBRIDS as KDA_HYBRIDS
from test_mamba2_hybrids import HYBRIDS
from test_minimax import build as build_minimax
from test_xlstm import build as build_xlstm

import writesae_lens.saes  # noqa: F401  (registers the architectures)
from hooked_ssm import HookedSSM
from writesae_lens.interventions import run_substitution_test
from writesae_lens.splicing import HookedSAESSM
from writesae_lens.training import build_runner

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER, HEAD = 2, 1
FAMILIES = {"bamba": HYBRIDS["bamba"].build, "granitemoehybrid": HYBRIDS["granitemoehybrid"].build,
            "nemotron_h": HYBRIDS["nemotron_h"].build, "falcon_h1": HYBRIDS["falcon_h1"].build,
            "olmo_hybrid": VARIANTS["olmo_hybrid"].build, "lara_mini": VARIANTS["lara_mini"].build,
            "qwen3_5_moe": VARIANTS["qwen3_5_moe"].build, "qwen4_exp": VARIANTS["qwen4_exp"].build,
            "minimax": build_minimax, "xlstm": build_xlstm, "zamba2": HYBRIDS["zamba2_two_blocks"].build,
            "kimi_linear": KDA_HYBRIDS["kimi_linear"].build, "bailing_hybrid": KDA_HYBRIDS["bailing_hybrid"].build,
            # GLM-5.3's indexer keeps 2 of the 6 pools here, and the fast test's ragged caches (rows
            # continuing prefixes of different lengths) leave empty slots that its pools skip.
            "glm5_next": KDA_HYBRIDS["glm5_next"].build}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_writesae_trains_splices_and_substitutes(family, dataset, tmp_path):
    FAMILIES[family]().save_pretrained(tmp_path / "model")
    model = HookedSSM.from_pretrained(tmp_path / "model")
    write_hook = f"blocks.{LAYER}.mixer.hook_write"

    runner = build_runner(
        model, dataset, LAYER, HEAD, "write", d_sae=32, k=4, training_tokens=64 * 40, context_size=32,
        train_batch_size_tokens=64, lr=3e-3, output_path=str(tmp_path / "sae"),
    )
    assert runner.cfg.hook_name == write_hook + "_factors"
    runner.run()
    sae = SAE.load_from_disk(tmp_path / "sae")
    assert sae.cfg.metadata.hook_name == write_hook and sae.cfg.metadata.hook_head_index == HEAD
    assert sae.cfg.d_in == model.cfg.d_k * model.cfg.d_v

    # Spliced on its head of hook_write: with the error term the forward is the clean one, bit for bit.
    tokens = torch.randint(3, 300, (4, 24), generator=torch.Generator().manual_seed(5))
    spliced = HookedSAESSM.from_hooked_ssm(model)
    with torch.no_grad():
        clean = spliced(tokens)
        torch.testing.assert_close(spliced.run_with_saes(tokens, saes=[sae], use_error_term=True), clean, atol=0, rtol=0)
    spliced.reset_saes()

    kwargs = dict(tokens=tokens, max_firings=6, progress=False, max_rows=9)
    fast, summary = run_substitution_test(spliced, sae, **kwargs)
    naive, _ = run_substitution_test(spliced, sae, method="naive", **kwargs)
    assert len(fast) == len(naive) > 0 and summary["n"] == len(fast)
    for a, b in zip(fast, naive):
        for key in ("kl_atom", "kl_delete", "kl_random"):
            assert math.isfinite(a[key]) and abs(a[key] - b[key]) <= 1e-6, (family, key, a[key], b[key])
