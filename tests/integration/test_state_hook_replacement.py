"""``hook_state`` is a replacement: the state that position t reads is exactly what the hook returned.

Checked on the three bundled toys (Gated DeltaNet, Mamba-2, RWKV-7), a tiny random Kimi Linear
(Kimi Delta Attention: per-channel decay) and both execution paths against a float64 per-token
loop written here from the mixer's own input hooks (``hook_q/k/v``, decay, ``hook_beta`` /
``hook_a`` / ``hook_erase_key``), independent of ``hooked_ssm.ops``. The
quantity compared is ``hook_read``, the read ``o_t = S_t^T q_t`` of each position.
"""

import pytest
import torch
from sae_lens import SAE
from test_kda_hybrids import build_kimi_linear

import hooked_ssm.components.recurrent_mixer as recurrent_mixer
import writesae_lens  # noqa: F401  (registers the bundled releases)
from hooked_ssm import HookedSSM
from hooked_ssm.state import RecurrentState
from writesae_lens.splicing import HookedSAESSM
from writesae_lens.demo import toy_sae_id

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER, HEAD, LENGTH, CHUNK = 1, 1, 72, 16  # 72 tokens: several chunks of 16, then a partial one; head 1 of the 2+ every family has
FAMILIES = ["toy-gdn", "toy-mamba2", "toy-rwkv7", "kimi-linear"]
TINY = {"kimi-linear": build_kimi_linear}  # families without a bundled toy: a tiny random checkpoint
EXECUTIONS = ["chunked", "recurrent"]
INPUTS = {  # the hooks the recurrence is computed from, per family
    "toy-gdn": ("hook_q", "hook_k", "hook_v", "hook_decay", "hook_beta"),
    "kimi-linear": ("hook_q", "hook_k", "hook_v", "hook_decay", "hook_beta"),
    "toy-mamba2": ("hook_q", "hook_k", "hook_v", "hook_decay"),
    "toy-rwkv7": ("hook_q", "hook_k", "hook_v", "hook_decay", "hook_a", "hook_erase_key"),
}


def mixer_hook(name: str) -> str:
    return f"blocks.{LAYER}.mixer.{name}"


@pytest.fixture(scope="module", params=[(f, e) for f in FAMILIES for e in EXECUTIONS], ids=lambda p: f"{p[0]}-{p[1]}")
def setup(request, tmp_path_factory):
    family, execution = request.param
    source = family
    if family in TINY:
        source = tmp_path_factory.mktemp(family)
        TINY[family]().save_pretrained(source)
    model = HookedSSM.from_pretrained(source, execution=execution)
    for block in model.blocks:
        if hasattr(getattr(block, "mixer", None), "chunk_size"):
            block.mixer.chunk_size = CHUNK  # several chunks, so the chunked path splits inside and across them
    tokens = torch.randint(3, model.cfg.d_vocab, (2, LENGTH), generator=torch.Generator().manual_seed(5))
    return family, model, tokens


def run(model, tokens, state_hook=None, **kwargs):
    """Logits and the layer's captured inputs and reads, with ``state_hook`` on its hook_state."""
    captured = {}

    def capture(act, hook):
        captured[hook.name.rsplit(".", 1)[-1]] = act.detach().clone()

    hooks = [(mixer_hook(name), capture) for name in (*INPUTS[model_family(model)], "hook_read")]
    if state_hook is not None:
        hooks.append((mixer_hook("hook_state"), state_hook))
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks, **kwargs)
    return logits, captured


def model_family(model) -> str:
    mixer = type(model.blocks[LAYER].mixer).__name__
    return {"GatedDeltaNetMixer": "toy-gdn", "Mamba2Mixer": "toy-mamba2", "RWKV7Mixer": "toy-rwkv7",
            "KimiDeltaAttentionMixer": "kimi-linear"}[mixer]


def reference_reads(family, inputs, replacements=None, write_edits=None):
    """Float64 per-token recurrence of the family: ``(reads [b, T, h, d_v], states [b, T, h, d_k, d_v])``.

    ``write_edits`` maps a position to a matrix added to the state after the update there (a write
    edit: it persists). ``replacements`` maps a position to a function of the state there without
    replacements (what the hook sees, write edits included) that returns the state installed at
    that position; the recurrence continues from it.
    """
    x = {name: t.double() for name, t in inputs.items()}
    q, k, v, decay = x["hook_q"], x["hook_k"], x["hook_v"], x["hook_decay"]
    batch, length, heads, d_k = k.shape
    state = torch.zeros(batch, heads, d_k, v.shape[-1], dtype=torch.float64)
    unedited = state.clone()
    reads, states = [], []
    for t in range(length):
        new = []
        for s in (state, unedited):
            if family in ("toy-gdn", "kimi-linear"):  # (I - b k k^T) A_t S + b k v^T, A_t per head or per key channel
                kt, bt = k[:, t], x["hook_beta"][:, t, :, None, None]
                s = (decay[:, t, ..., None] if decay.dim() == 4 else decay[:, t, :, None, None]) * s
                erased = s - bt * kt[..., :, None] * torch.einsum("bhk,bhkv->bhv", kt, s)[..., None, :]
                s = erased + bt * kt[..., :, None] * v[:, t, :, None, :]
            elif family == "toy-mamba2":
                s = decay[:, t, :, None, None] * s + k[:, t, ..., :, None] * v[:, t, :, None, :]
            else:  # RWKV-7: diag(w) S - (a * kappa)(kappa^T S) + k v^T
                kappa = x["hook_erase_key"][:, t]
                erase = torch.einsum("bhk,bhkv->bhv", kappa, s)
                s = (decay[:, t, ..., None] * s - (x["hook_a"][:, t] * kappa)[..., None] * erase[..., None, :]
                     + k[:, t, ..., :, None] * v[:, t, :, None, :])
            if write_edits and t in write_edits:
                s = s + write_edits[t]
            new.append(s)
        state, unedited = new
        if replacements and t in replacements:
            state = replacements[t](unedited)
        reads.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
        states.append(state)
    return torch.stack(reads, 1), torch.stack(states, 1)


def flat_matrix(model, seed, scale):
    """A random ``[head, d_k*d_v]`` edit, ``scale`` times the size of a typical state entry."""
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(model.cfg.n_heads, model.cfg.d_k * model.cfg.d_v, generator=gen)


def close(actual, expected, rel=2e-4):
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=rel * expected.abs().max().item())


def test_reference_loop_matches_the_model(setup):
    family, model, tokens = setup
    _, seen = run(model, tokens)
    close(seen["hook_read"], reference_reads(family, seen)[0])


def test_an_edit_of_one_head_at_every_position_moves_only_that_reads(setup):
    """(a) Returning S_t + E for one head at every t shifts that head's read by exactly E^T q_t."""
    family, model, tokens = setup
    _, clean = run(model, tokens)
    scale = reference_reads(family, clean)[1].abs().mean().item()
    E = flat_matrix(model, 0, 3 * scale)[HEAD]

    def add_to_one_head(states, hook):
        states = states.clone()
        states[:, :, HEAD] += E
        return states

    logits, edited = run(model, tokens, add_to_one_head)
    shift = edited["hook_read"].double() - clean["hook_read"].double()
    E_matrix = E.double().view(model.cfg.d_k, model.cfg.d_v)
    expected = torch.einsum("kv,bpk->bpv", E_matrix, clean["hook_q"][:, :, HEAD].double())
    close(shift[:, :, HEAD], expected, rel=1e-4)
    others = [h for h in range(model.cfg.n_heads) if h != HEAD]
    assert shift[:, :, others].abs().max() <= 1e-4 * clean["hook_read"].abs().max()
    # The same shift at the first and the last position: it does not accumulate.
    ratio = shift[:, -1, HEAD].norm() / expected[:, -1].norm()
    assert abs(ratio.item() - 1) < 1e-3


@pytest.mark.parametrize("selected", [[30], [23, 50], [50, 23, 24]], ids=["one", "two", "three unsorted"])
def test_selected_positions_continue_the_recurrence_from_the_returned_state(setup, selected):
    """(b) With one or two selected positions, each reads exactly what the hook returned and later
    positions read the recurrence continued from it (the second replacement is not additive)."""
    family, model, tokens = setup
    _, clean = run(model, tokens)
    scale = reference_reads(family, clean)[1].abs().mean().item()
    edits = [flat_matrix(model, 1 + i, 3 * scale) for i in range(len(selected))]

    def replace(states, hook):
        assert states.shape[1] == len(selected)
        return states + torch.stack(edits, dim=0)[None]

    _, edited = run(model, tokens, replace, state_positions=selected)
    as_matrix = lambda e: e.double().view(model.cfg.n_heads, model.cfg.d_k, model.cfg.d_v)  # noqa: E731
    replacements = {t: (lambda s, e=e: s + as_matrix(e)) for t, e in zip(selected, edits)}
    expected, _ = reference_reads(family, clean, replacements)
    close(edited["hook_read"], expected)
    first = min(selected)
    torch.testing.assert_close(edited["hook_read"][:, :first], clean["hook_read"][:, :first],
                               atol=1e-5 * clean["hook_read"].abs().max().item(), rtol=0)


@pytest.mark.parametrize("order", ["state before write", "state after write"])
def test_state_hooks_see_write_edits_and_write_edits_persist_through_replacements(setup, order):
    """A write edit at one position and a state replacement at another, in one forward: the hook
    sees the states with the write edit in them, and the write edit persists after a replacement."""
    family, model, tokens = setup
    _, clean = run(model, tokens)
    scale = reference_reads(family, clean)[1].abs().mean().item()
    at_write, at_state = (40, 25) if order == "state before write" else (25, 40)
    D, E = flat_matrix(model, 3, 3 * scale), flat_matrix(model, 4, 3 * scale)

    def add_write(write, hook):
        write = write.clone()
        write[:, at_write] += D
        return write

    def add_state(states, hook):
        return states + E

    with torch.no_grad(), model.hooks(fwd_hooks=[(mixer_hook("hook_write"), add_write)]):
        _, edited = run(model, tokens, add_state, state_positions=[at_state])
    as_matrix = lambda e: e.double().view(model.cfg.n_heads, model.cfg.d_k, model.cfg.d_v)  # noqa: E731
    expected, _ = reference_reads(family, clean, {at_state: lambda s: s + as_matrix(E)}, {at_write: as_matrix(D)})
    close(edited["hook_read"], expected)


@pytest.mark.parametrize("selection", [None, [LENGTH - 1]], ids=["all", "last"])
def test_the_final_state_is_the_last_returned_one(setup, selection):
    family, model, tokens = setup
    returned = []

    def add_one(states, hook):
        returned.append(states[:, -1] + 1.0)
        return states + 1.0

    past = RecurrentState.empty(model.cfg.layer_types)
    run(model, tokens, add_one, past_state=past, state_positions=selection)
    final = past.layers[LAYER].ssm_state
    torch.testing.assert_close(final.flatten(-2), returned[0], atol=0, rtol=0)


IDENTITIES = {
    "returns its input": lambda states: states,
    "returns a clone": lambda states: states.clone(),
    "in-place no-op": lambda states: states.mul_(1.0),
}


@pytest.mark.parametrize("identity", [*IDENTITIES, "SAELens error term"])
def test_identity_hooks_change_nothing(setup, identity, monkeypatch):
    """(c) Hooks that return the states they were given (or SAELens's ``recon + (x - recon)``)."""
    family, model, tokens = setup
    # Compared with a hook that only observes (RWKV-7 then runs its per-token form, to produce the states).
    clean_logits, clean = run(model, tokens, lambda states, hook: None)
    replaced = []
    real = recurrent_mixer.replace_states
    monkeypatch.setattr(recurrent_mixer, "replace_states", lambda *a: replaced.append(1) or real(*a))

    def hook(states, hook):
        if identity in IDENTITIES:
            return IDENTITIES[identity](states)
        recon = (states * 0.7).bfloat16().float()  # any lossy reconstruction
        return recon + (states - recon)

    logits, edited = run(model, tokens, hook)
    if identity in IDENTITIES:
        assert not replaced  # detected as no change: nothing re-read, nothing re-scanned
        assert torch.equal(logits, clean_logits)
    else:
        close(edited["hook_read"].double(), clean["hook_read"].double(), rel=1e-5)
        torch.testing.assert_close(logits, clean_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("execution", EXECUTIONS)
def test_spliced_state_sae_loss_equals_a_loop_reading_the_sae_reconstruction(execution):
    """(d) The bundled state-site SAE spliced by HookedSAESSM: the loss equals that of a model whose
    head reads ``sae(S_t)`` at every t, with S_t from the float64 loop."""
    sae = SAE.from_pretrained("writesae-toy-gdn", toy_sae_id(site="state"))
    assert sae.cfg.metadata.hook_name == mixer_hook("hook_state")
    head = sae.cfg.metadata.hook_head_index
    model = HookedSAESSM.from_pretrained("toy-gdn", execution=execution)
    tokens = torch.randint(3, model.cfg.d_vocab, (2, LENGTH), generator=torch.Generator().manual_seed(6))
    _, clean = run(model, tokens)
    _, states = reference_reads("toy-gdn", clean)
    with torch.no_grad():
        recon = sae(states[:, :, head].flatten(-2).float()).double().view(states[:, :, head].shape)
    read = torch.einsum("bpkv,bpk->bpv", recon, clean["hook_q"][:, :, head].double())

    def read_the_reconstruction(o, hook):
        o = o.clone()
        o[:, :, head] = read.to(o.dtype)
        return o

    with torch.no_grad():
        expected = model.run_with_hooks(tokens, return_type="loss",
                                        fwd_hooks=[(mixer_hook("hook_read"), read_the_reconstruction)])
        spliced = model.run_with_saes(tokens, saes=[sae], return_type="loss")
        clean_loss = model(tokens, return_type="loss")
    assert abs(spliced.item() - expected.item()) < 1e-4
    assert abs(spliced.item() - clean_loss.item()) > 1e-3  # the splice matters
