"""Feature amplification adds exactly offset x atom to the site and leaves the rest of the model alone."""

import torch
from sae_lens import SAE

import writesae_lens  # noqa: F401  (registers the bundled release)
from hooked_ssm import HookedSSM
from writesae_lens.interventions.amplification import amplified, amplified_generate
from writesae_lens.demo import toy_sae_id

SAE_ID = toy_sae_id(site="write")


def test_amplification_equals_adding_the_atom_to_the_write():
    model = HookedSSM.from_pretrained("toy-gdn", device="cpu")
    sae = SAE.from_pretrained("writesae-toy-gdn", SAE_ID)
    tokens = torch.randint(3, model.cfg.d_vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    feature, offset = 7, 3.0
    atom = sae.decode(torch.eye(sae.cfg.d_sae)[feature][None]) - sae.decode(torch.zeros(1, sae.cfg.d_sae))

    def add_atom(write, hook, head=sae.cfg.metadata.hook_head_index):
        write[:, :, head] += offset * atom[0]
        return write

    with torch.no_grad():
        expected = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.mixer.hook_write", add_atom)])
        clean = model(tokens)
        with amplified(model, sae, [feature], offset) as sae_model:
            got = sae_model(tokens)
        with amplified(model, sae, [feature], 0.0) as sae_model:
            unchanged = sae_model(tokens)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(unchanged, clean, atol=1e-5, rtol=1e-5)
    assert (got - clean).abs().max() > 1e-3

    prompt = tokens[:1, :10]
    assert torch.equal(amplified_generate(model, sae, [feature], 0.0, prompt, max_new_tokens=6),
                       model.generate(prompt, max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False))
