"""Random perturbation of tiny reference models, shared by tests.

Its own module, not conftest: with several conftest.py files, `from conftest import ...` resolves
to whichever conftest pytest imported first."""

from __future__ import annotations

import torch


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter: HF initialises norms to 0/1 and gates to constants, which would hide bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.3 if ("norm" in name or "A_log" in name or "dt_bias" in name) else 0.05
            param.add_(scale * torch.randn(param.shape, generator=gen))
    return model.eval()
