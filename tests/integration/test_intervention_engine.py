"""The intervention engine against brute force: every branch equals a full ``run_with_hooks`` of
its prompt with the same edits applied by a hand-written hook (and, for generation, a token-by-token
greedy loop over full re-runs), on the hybrid Gated DeltaNet fixture, toy Mamba-2 and RWKV-7."""

import pytest
import torch
import torch.nn.functional as F

from hooked_ssm import HookedSSM
from writesae_lens.interventions.engine import (
    KL,
    Branch,
    Edit,
    InterventionEngine,
    LogitShift,
    TokenLogProbs,
    add_to_state,
    install,
    kl_divergence,
    replace_write,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hybrid(qwen35):
    return HookedSSM.from_pretrained(qwen35[0])  # layers: lin, lin, full, lin, full


def brute_logits(model, prompt, edits, length=None):
    """Logits of a full run of ``prompt[:length]`` with ``edits`` applied by plain hooks."""
    tokens = prompt[None, :length]
    by_hook = {}
    for e in edits:
        by_hook.setdefault(e.hook_name, []).append(e)

    def make(hook_edits):
        def hook(act, hook):
            act = act.clone()
            for e in hook_edits:
                if e.position >= act.shape[1]:  # an edit of a later decoding step
                    continue
                index = (0, e.position) if e.head is None else (0, e.position, e.head)
                value = e.value.reshape(act[index].shape).to(act)
                act[index] = value if e.mode == "replace" else act[index] + value
            return act
        return hook

    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=[(name, make(es)) for name, es in by_hook.items()])[0]


def random_branches(model, prompts, layer, head, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    d = model.cfg.d_k * model.cfg.d_v
    branches = []
    for i in range(n):
        p = i % len(prompts)
        length = len(prompts[p])
        t = int(torch.randint(0, length - 1, (1,), generator=gen))
        end = int(torch.randint(t, length, (1,), generator=gen))
        kind = i % 3
        value = torch.randn(d, generator=gen)
        if kind == 0:
            edits = [replace_write(layer, head, t, value)]
        elif kind == 1:
            edits = [add_to_state(layer, head, t, 0.5 * value)]
        else:  # an install over up to three positions
            positions = list(range(t, min(t + 3, end + 1)))
            edits = install(layer, head, positions, [0.3 * value] * len(positions))
        scored = sorted({t, end, (t + end) // 2})
        branches.append(Branch(p, edits, scored=scored, end=end))
    return branches


def check_against_brute(model, prompts, branches, **engine_kwargs):
    engine = InterventionEngine(model, **engine_kwargs)
    results = engine.run(prompts, branches, KL(), batch_size=2)
    shifts = engine.run(prompts, branches, LogitShift(ranks=(0, 3)), batch_size=2)
    with torch.no_grad():
        bases = [model(p[None])[0] for p in prompts]
    for b, r, s in zip(branches, results, shifts):
        logits = brute_logits(model, prompts[b.prompt], b.edits)
        base = bases[b.prompt]
        expected = kl_divergence(logits[b.scored], base[b.scored])
        torch.testing.assert_close(r.scores["kl"], expected, atol=1e-6, rtol=1e-4)
        top = base[b.scored].argsort(-1, descending=True)[:, [0, 3]]
        assert torch.equal(s.scores["token"], top)
        torch.testing.assert_close(s.scores["shift"], (logits[b.scored].gather(-1, top) - base[b.scored].gather(-1, top)).double(),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layer,head", [(0, 1), (1, 2), (3, 0)])
@pytest.mark.parametrize("max_rows", [3, 48])
def test_branches_equal_full_reruns_on_the_hybrid(hybrid, layer, head, max_rows):
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 300, (n,), generator=gen) for n in (14, 14, 9)]
    check_against_brute(hybrid, prompts, random_branches(hybrid, prompts, layer, head, 12), max_rows=max_rows,
                        min_segment=3)


def test_branches_equal_full_reruns_on_mamba2():
    model = HookedSSM.from_pretrained("toy-mamba2", device="cpu")
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, model.cfg.d_vocab, (12,), generator=gen) for _ in range(2)]
    check_against_brute(model, prompts, random_branches(model, prompts, 1, 3, 8), max_rows=5, min_segment=2)


def test_branches_equal_full_reruns_on_rwkv7(tmp_path):
    from test_rwkv7_parity import make_blink_state_dict

    path = tmp_path / "rwkv7-tiny.pth"
    torch.save(make_blink_state_dict(seed=3), path)
    model = HookedSSM.from_pretrained(path, device="cpu")
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, model.cfg.d_vocab, (10,), generator=gen) for _ in range(2)]
    check_against_brute(model, prompts, random_branches(model, prompts, 1, 1, 8), max_rows=4, min_segment=2)


def test_branches_equal_full_reruns_on_qwen4_exp(tmp_path):
    """Edits at layer 2 of Qwen4-Exp: the branches start there with the token ids its Per-Layer
    Embedding reads, and continue ragged caches of its indexed attention (layer 3)."""
    from test_gdn_variants import VARIANTS

    VARIANTS["qwen4_exp"].build().save_pretrained(tmp_path)
    model = HookedSSM.from_pretrained(tmp_path, device="cpu")
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 300, (n,), generator=gen) for n in (30, 30, 21)]
    branches = random_branches(model, prompts, 2, 1, 12)
    # An edit at the first token: its row starts from an untouched state, stacked with rows that are not.
    branches.append(Branch(1, [replace_write(2, 1, 0, torch.randn(model.cfg.d_k * model.cfg.d_v, generator=gen))],
                           scored=[0, 5, 20], end=20))
    check_against_brute(model, prompts, branches, max_rows=5, min_segment=3)


def test_generation_equals_a_greedy_loop_of_full_reruns(hybrid):
    """Installs inside the prompt and during decoding, then greedy tokens: each step equals the
    argmax of a full re-run of prompt + tokens so far, with every edit applied by a plain hook."""
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 300, (10,), generator=gen) for _ in range(2)]
    d = hybrid.cfg.d_k * hybrid.cfg.d_v
    big = lambda: 20 * torch.randn(d, generator=gen)  # noqa: E731
    branches = [
        Branch(0, install(1, 2, [6, 7, 8], [big(), big(), big()]), generate=5),
        Branch(1, install(1, 2, [9, 10, 11], [big(), big(), big()]), generate=5),  # 10, 11: while decoding
        Branch(0, [], generate=5),  # unpatched control
        Branch(1, [Edit("blocks.3.mixer.hook_write", 4, big(), 0, "add")], generate=3),
    ]
    targets = torch.randint(3, 300, (len(branches), 2), generator=gen)
    results = InterventionEngine(hybrid, max_rows=3, min_segment=2).run(prompts, branches, TokenLogProbs(targets))
    for b, r, target in zip(branches, results, targets):
        sequence = prompts[b.prompt]
        assert r.generated.shape == (b.generate,)
        for g in range(b.generate):
            logits = brute_logits(hybrid, sequence, b.edits)[-1]
            assert int(r.generated[g]) == int(logits.argmax())
            torch.testing.assert_close(r.generated_scores["logprob"][g], F.log_softmax(logits.double(), -1)[target],
                                       atol=1e-4, rtol=1e-4)
            sequence = torch.cat([sequence, r.generated[g : g + 1]])


def test_bad_branches_are_refused(hybrid):
    prompts = [torch.arange(3, 13)]
    engine = InterventionEngine(hybrid)
    with pytest.raises(ValueError, match="no such prompt"):
        engine.run(prompts, [Branch(1, [replace_write(1, 0, 2, torch.zeros(hybrid.cfg.d_k * hybrid.cfg.d_v))])], KL())
    with pytest.raises(ValueError, match="outside the branch's window"):
        engine.run(prompts, [Branch(0, [replace_write(1, 0, 5, torch.zeros(1))], scored=[3])], KL())
    with pytest.raises(ValueError, match="generates"):
        engine.run(prompts, [Branch(0, [], end=5, generate=2)], KL())
