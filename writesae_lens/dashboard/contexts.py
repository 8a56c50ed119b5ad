"""Streaming top-k contexts per atom: the corpus passes through once, batch by batch, and only the
``k`` best windows of each atom (one snippet per window, around its best position) are kept."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor


@dataclass
class Context:
    """One snippet of a window: ``tokens`` with one value per channel per token; ``focus`` is the
    index (within the snippet) of the position that ranked it, ``score`` its score there."""

    window: int
    position: int
    focus: int
    score: float
    tokens: list[int]
    channels: dict[str, list[float]] = field(default_factory=dict)


class TopContexts:
    """The ``k`` windows with the largest ``score`` of each atom, kept as fixed-size tensors.

    ``update`` takes a batch's per-position scores ``[batch, pos, atom]`` (``-inf`` where a
    position may not be chosen), picks each window's best position per atom and merges those
    candidates with the current top ``k``; the snippet ``[p - left, p + right]`` around each kept
    position stores the token ids and every channel (e.g. the code, the read ``u . q``) at once,
    since the batch's activations are gone after the call.
    """

    def __init__(self, n_atoms: int, k: int, channels: tuple[str, ...], left: int = 20, right: int = 6):
        self.k, self.left, self.right, self.channels = k, left, right, channels
        width = left + right + 1
        self.score = torch.full((n_atoms, k), -torch.inf)
        self.window = torch.full((n_atoms, k), -1, dtype=torch.long)
        self.position = torch.full((n_atoms, k), -1, dtype=torch.long)
        self.tokens = torch.full((n_atoms, k, width), -1, dtype=torch.long)  # -1: outside the window
        self.values = {name: torch.zeros(n_atoms, k, width) for name in channels}

    @torch.no_grad()
    def update(
        self,
        score: Float[Tensor, "batch pos atom"],
        window_ids: Int[Tensor, "batch"],
        tokens: Int[Tensor, "batch pos"],
        channels: dict[str, Float[Tensor, "batch pos atom"]],
    ) -> None:
        batch, length, _ = score.shape
        best, pos = score.max(dim=1)  # [batch, atom]
        offsets = torch.arange(-self.left, self.right + 1)
        index = pos[:, :, None] + offsets  # [batch, atom, width]
        inside = (index >= 0) & (index < length)
        index = index.clamp(0, length - 1)
        snippet_tokens = torch.where(inside, tokens.gather(1, index.flatten(1)).view_as(index), -1)
        snippet_values = {
            name: torch.where(inside, channels[name].float().permute(0, 2, 1).gather(2, index), 0.0)
            for name in self.channels
        }
        # Merge the [atom, k] kept with the [atom, batch] candidates.
        scores = torch.cat([self.score, best.T.float()], dim=1)
        keep = scores.topk(self.k, dim=1, sorted=True).indices  # [atom, k]

        def merge(kept: Tensor, new: Tensor) -> Tensor:
            both = torch.cat([kept, new], dim=1)
            return both.gather(1, keep.view(*keep.shape, *([1] * (both.dim() - 2))).expand(-1, -1, *both.shape[2:]))

        self.score = scores.gather(1, keep)
        self.window = merge(self.window, window_ids[None, :].expand(score.shape[2], -1))
        self.position = merge(self.position, pos.T)
        self.tokens = merge(self.tokens, snippet_tokens.transpose(0, 1))
        for name in self.channels:
            self.values[name] = merge(self.values[name], snippet_values[name].transpose(0, 1))

    def contexts(self, atom: int) -> list[Context]:
        """The kept contexts of ``atom``, best first (padding outside the window dropped; channel
        values to 6 significant digits)."""
        out = []
        for j in range(self.k):
            if not torch.isfinite(self.score[atom, j]):
                break
            inside = self.tokens[atom, j] >= 0
            first = int(inside.nonzero()[0])
            out.append(Context(
                window=int(self.window[atom, j]), position=int(self.position[atom, j]),
                focus=self.left - first, score=float(self.score[atom, j]),
                tokens=self.tokens[atom, j][inside].tolist(),
                channels={name: [float(f"{v:.6g}") for v in self.values[name][atom, j][inside].tolist()] for name in self.channels},
            ))
        return out
