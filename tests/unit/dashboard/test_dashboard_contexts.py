"""TopContexts against a brute-force ranking of every window's best position."""

import torch

from writesae_lens.dashboard.contexts import TopContexts


def brute_force(score, tokens, values, atom, k, left, right):
    """Per window: its best position for ``atom``; keep the k best windows (ties: earlier window)."""
    best = []
    for window in range(score.shape[0]):
        column = score[window, :, atom]
        if not torch.isfinite(column).any():
            continue
        pos = int(column.argmax())
        best.append((-float(column[pos]), window, pos))
    out = []
    for neg, window, pos in sorted(best)[:k]:
        lo, hi = max(0, pos - left), min(score.shape[1], pos + right + 1)
        out.append(dict(window=window, position=pos, focus=pos - lo, score=-neg,
                        tokens=tokens[window, lo:hi].tolist(), act=values[window, lo:hi, atom].tolist()))
    return out


def test_streaming_top_contexts_match_brute_force():
    torch.manual_seed(0)
    n_windows, length, n_atoms, k, left, right = 13, 17, 5, 4, 3, 2
    score = torch.rand(n_windows, length, n_atoms)
    score[score < 0.3] = -torch.inf  # ineligible positions
    score[:, :, 4] = -torch.inf  # an atom that never qualifies
    score[2:, :, 3] = -torch.inf  # an atom eligible in two windows only: fewer than k contexts
    tokens = torch.randint(0, 50, (n_windows, length))
    values = torch.randn(n_windows, length, n_atoms)
    top = TopContexts(n_atoms, k, ("act",), left, right)
    for start in range(0, n_windows, 3):  # uneven batches, streamed
        sl = slice(start, start + 3)
        top.update(score[sl], torch.arange(n_windows)[sl], tokens[sl], {"act": values[sl]})
    for atom in range(n_atoms):
        got = top.contexts(atom)
        want = brute_force(score, tokens, values, atom, k, left, right)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert (g.window, g.position, g.focus, g.tokens) == (w["window"], w["position"], w["focus"], w["tokens"])
            assert abs(g.score - w["score"]) < 1e-6
            assert torch.allclose(torch.tensor(g.channels["act"]), torch.tensor(w["act"]), atol=1e-4)
    assert top.contexts(4) == []
    assert len(top.contexts(3)) == 2
