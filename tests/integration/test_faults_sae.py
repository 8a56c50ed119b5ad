"""Fault catalogue, SAE layer (loading, splicing, protocols): every bad SAE, id or atom gets an error
(or, for an SAE used on another model / site, a warning) that names the problem and the fix."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from hooked_ssm import HookedSSM
from writesae_lens import HookedSAESSM
from writesae_lens.interventions.amplification import amplified
from writesae_lens.interventions.erasure import run_erasure
from writesae_lens.interventions.firings import resolve_site
from writesae_lens.interventions.logit_shift import run_logit_shift_audit
from writesae_lens.loading import load_sae
from writesae_lens.sae_checks import SAEModelMismatchError, SAEModelMismatchWarning
from writesae_lens.demo import toy_sae_id, toy_site

pytestmark = pytest.mark.usefixtures("one_thread")

RELEASE, SAE_ID = "writesae-toy-gdn", toy_sae_id(site="write")
OTHER_HEADS = [h for h in range(4) if h != toy_site("toy-gdn")[1]]  # toy-gdn has 4 heads
TOKENS = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def sae():
    return load_sae(f"{RELEASE}/{SAE_ID}")


@pytest.fixture(scope="module")
def models():
    return {"gdn": HookedSSM.from_pretrained("toy-gdn"), "mamba2": HookedSAESSM.from_pretrained("toy-mamba2")}


@pytest.fixture()
def truncated_sae_dir(sae, tmp_path):
    sae.save_model(tmp_path)
    weights = tmp_path / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return tmp_path


def _with_amplified(model, sae, features):
    with amplified(model, sae, features, 1.0):
        pass


ERRORS = [
    ("release without an id", lambda s, m, d: load_sae(RELEASE), ValueError,
     [RELEASE, f"{toy_sae_id(site='state')}, {toy_sae_id(site='write')}", "release/id or --sae-id"]),
    ("release with an unknown id", lambda s, m, d: load_sae(f"{RELEASE}/{SAE_ID.replace('hook_write', 'hook_writ')}"), ValueError,
     [f"has no SAE '{SAE_ID.replace('hook_write', 'hook_writ')}'", "its ids are", f"Did you mean '{SAE_ID}'?"]),
    ("unknown release or missing directory", lambda s, m, d: load_sae("writesae-toy-gdm/x"), FileNotFoundError,
     ["neither an existing directory nor a known release", f"Did you mean '{RELEASE}'?"]),
    ("SAE path is a file", lambda s, m, d: load_sae(d / "cfg.json"), FileNotFoundError,
     ["is a file", "SAE's directory"]),
    ("truncated SAE weights", lambda s, m, d: load_sae(d), ValueError,
     ["sae_weights.safetensors", "not a readable safetensors file", "re-save or re-download"]),
    ("missing SAE weights", lambda s, m, d: ((d / "sae_weights.safetensors").unlink(), load_sae(d)),
     FileNotFoundError, ["sae_weights.safetensors is missing"]),
    ("atom index out of range (erasure)", lambda s, m, d: run_erasure(m["gdn"], s, tokens=TOKENS, feature=512),
     ValueError, ["feature 512 out of range", "d_sae=512", "indices 0..511"]),
    ("atom indices out of range (logit shift)",
     lambda s, m, d: run_logit_shift_audit(m["gdn"], s, tokens=TOKENS, atoms=[3, -1], progress=False),
     ValueError, ["atoms -1 out of range", "indices 0..511"]),
    ("feature index out of range (amplification)", lambda s, m, d: _with_amplified(m["gdn"], s, [600]),
     ValueError, ["features 600 out of range"]),
    ("SAE of another model spliced with strict=True", lambda s, m, d: m["mamba2"].add_sae(s, strict=True),
     SAEModelMismatchError, ["trained on model 'toy-gdn'", "used on 'toy-mamba2'", "load the SAE trained for this model"]),
    ("protocol site on another head with strict=True", lambda s, m, d: resolve_site(m["gdn"], s, 1, OTHER_HEADS[0], strict=True),
     SAEModelMismatchError, [f"trained on head {toy_site()[1]}", f"used on head {OTHER_HEADS[0]}"]),
]


@pytest.mark.parametrize("call, error, fragments", [case[1:] for case in ERRORS], ids=[case[0] for case in ERRORS])
def test_fault_gets_a_clear_error(sae, models, truncated_sae_dir, call, error, fragments):
    try:
        with pytest.raises(error) as info:
            call(sae, models, truncated_sae_dir)
    finally:
        models["mamba2"].reset_saes()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert not re.search(r"Traceback", message)


WARNINGS = [
    ("SAE of another model spliced", lambda s, m: m["mamba2"].add_sae(s),
     ["trained on model 'toy-gdn'", "used on 'toy-mamba2'"]),
    ("SAE of another model in a protocol", lambda s, m: resolve_site(m["mamba2"], s),
     ["trained on model 'toy-gdn'", "used on 'toy-mamba2'"]),
    ("protocol on another layer", lambda s, m: resolve_site(m["gdn"], s, 0, 0),
     ["trained on hook 'blocks.1.mixer.hook_write'", "used on 'blocks.0.mixer.hook_write'"]),
    ("protocol on another head", lambda s, m: resolve_site(m["gdn"], s, 1, OTHER_HEADS[1]),
     [f"trained on head {toy_site()[1]}", f"used on head {OTHER_HEADS[1]}"]),
]


@pytest.mark.parametrize("call, fragments", [case[1:] for case in WARNINGS], ids=[case[0] for case in WARNINGS])
def test_mismatch_warns_naming_both_sides(sae, models, call, fragments):
    try:
        with pytest.warns(SAEModelMismatchWarning) as record:
            call(sae, models)
    finally:
        models["mamba2"].reset_saes()
    message = " ".join(str(w.message) for w in record if issubclass(w.category, SAEModelMismatchWarning))
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"


def test_a_matching_sae_is_used_in_silence(sae, models):
    gdn = HookedSAESSM.from_hooked_ssm(HookedSSM.from_pretrained("toy-gdn"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SAEModelMismatchWarning)
        resolve_site(models["gdn"], sae)
        gdn.add_sae(sae, strict=True)
    gdn.reset_saes()
