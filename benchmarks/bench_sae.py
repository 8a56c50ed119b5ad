"""Benchmark 4: WriteSAE training throughput.

(a) One SAE training step (``training_forward_pass`` + backward + Adam step) per architecture —
    ``writesae``, ``writesae_matrix``, ``writesae_bilinear`` — against SAELens's flat
    ``TopKTrainingSAE`` on the same ``d_in = d_k * d_v`` (A = flat TopK, B = the architecture).
    SAE steps/s, tokens/s (= batch x steps/s; the language model's forward pass that would produce
    the activations is not included) and peak memory. Inputs are rank-1 writes ``b k v^T``.
(b) Factored write-site training, as SAELens's runner runs it: one ``training_forward_pass`` +
    backward of a ``writesae`` reading ``[k | v]`` (``input_kind="write_factors"``, what
    ``build_runner(..., site="write")`` trains on ``hook_write_factors``) vs the same SAE reading the
    materialised ``vec(k v^T)`` (``hook_write``), same weights, at d_k = d_v = 128, d_sae = 2048,
    k = 32, batch 256. Once with no dead atoms (the headline, no aux loss) and once with half the
    atoms dead (the dead-latent aux loss, k_aux = 256, is computed on both sides).

Where SAELens is not importable (the GPU machine), (b) runs an inline re-implementation of the
same two computations without the aux loss (``InlineWriteSAE`` below; checked against the library
on CPU, row ``4 sae: inline check``) and (a) is skipped.
"""

from __future__ import annotations

from typing import Any

import torch

from common import Settings, compare, measure_peak, mib

D_K = D_V = 128
D_SAE = 2048
K = 32
BATCH = 256
TARGET_FACTORED = ">= 10 (factored >= 10x materialised)"


def sae_lens_available() -> bool:
    try:
        import sae_lens  # noqa: F401

        import writesae_lens.saes  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def rank1_inputs(batch: int, d_k: int, d_v: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of rank-1 writes: a unit key (as after the GDN L2 norm) and a value scaled by beta."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, d_k, generator=gen)
    k = k / k.norm(dim=-1, keepdim=True)
    v = torch.randn(batch, d_v, generator=gen) * torch.rand(batch, 1, generator=gen)
    return k.to(device), v.to(device)


# --------------------------------------------------------------------------- (a) architectures


def make_training_sae(architecture: str, d_k: int, d_v: int, device: str) -> Any:
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

    from writesae_lens.saes import ARCHITECTURES

    torch.manual_seed(0)
    if architecture == "topk (SAELens flat)":
        return TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_k * d_v, d_sae=D_SAE, k=K, device=device))
    cfg_cls, sae_cls = ARCHITECTURES[architecture][3], ARCHITECTURES[architecture][2]
    return sae_cls(cfg_cls(d_in=d_k * d_v, d_sae=D_SAE, d_k=d_k, d_v=d_v, k=K, device=device))


def training_step_fn(sae: Any, x: torch.Tensor) -> Any:
    from sae_lens.saes.sae import TrainStepInput

    opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=3e-4)
    dead = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=x.device)
    counter = [0]

    def step():
        counter[0] += 1
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                       n_training_steps=counter[0], is_logging_step=False))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    return step


def run_architectures(settings: Settings) -> None:
    sizes = [(D_K, D_V)] if (settings.quick or settings.cuda) else [(64, 64), (D_K, D_V)]
    for d_k, d_v in sizes:
        k, v = rank1_inputs(BATCH, d_k, d_v, settings.device)
        x = (k[:, :, None] * v[:, None, :]).flatten(1)
        spec = dict(kind="sae_step", batch=BATCH, d_k=d_k, d_v=d_v)
        baseline = make_training_sae("topk (SAELens flat)", d_k, d_v, settings.device)
        base_step = training_step_fn(baseline, x)
        base_mem = measure_peak(settings, dict(spec, architecture="topk (SAELens flat)"), base_step)
        for arch in ("writesae", "writesae_matrix", "writesae_bilinear"):
            sae = make_training_sae(arch, d_k, d_v, settings.device)
            step = training_step_fn(sae, x)
            mem = measure_peak(settings, dict(spec, architecture=arch), step)
            compare(settings, bench="4 sae", case=f"training step {arch} vs flat TopK, d_k=d_v={d_k}, d_sae={D_SAE}, k={K}, batch {BATCH}",
                    reference=("SAELens TopKTrainingSAE (flat)", base_step), candidate=(arch, step),
                    tokens=BATCH, max_rounds=9,
                    extra=dict(ref_steps_per_s=None, peak_mib_ref=mib(base_mem["peak_bytes"]),
                               peak_mib_cand=mib(mem["peak_bytes"]), memory_how=mem["how"],
                               n_params_ref=sum(p.numel() for p in baseline.parameters()),
                               n_params_cand=sum(p.numel() for p in sae.parameters())))
            row = settings.results[-1]
            row["ref_steps_per_s"] = 1 / row["ref_median_s"]
            row["cand_steps_per_s"] = 1 / row["cand_median_s"]
            settings.save()
            del sae, step


# --------------------------------------------------------------------------- (b) factored vs materialised


def _zero(params: Any) -> None:
    for p in params:
        p.grad = None


def library_saes(device: str) -> tuple[Any, Any]:
    """The default training ``writesae`` on ``vec(k v^T)`` and the same SAE (same weights) on ``[k | v]``."""
    from writesae_lens.saes import WriteTrainingSAE, WriteTrainingSAEConfig

    torch.manual_seed(0)
    common = dict(d_sae=D_SAE, d_k=D_K, d_v=D_V, k=K, device=device)
    matrix = WriteTrainingSAE(WriteTrainingSAEConfig(d_in=D_K * D_V, **common))
    factors = WriteTrainingSAE(WriteTrainingSAEConfig(
        d_in=D_K + D_V, input_kind="write_factors", normalize_activations="none", write_scale=1.0, **common
    ))
    factors.load_state_dict(matrix.state_dict())
    return matrix, factors


def library_paths(matrix: Any, factors: Any, k: torch.Tensor, v: torch.Tensor, dead: torch.Tensor):
    """One training step each (``training_forward_pass`` + backward), on what SAELens's store hands over."""
    from sae_lens.saes.sae import TrainStepInput

    x = (k[:, :, None] * v[:, None, :]).flatten(1)
    kv = torch.cat([k, v], dim=-1)

    def step(sae: Any, sae_in: torch.Tensor):
        def run():
            out = sae.training_forward_pass(TrainStepInput(sae_in=sae_in, coefficients={}, dead_neuron_mask=dead,
                                                           n_training_steps=0, is_logging_step=False))
            out.loss.backward()
            _zero(sae.parameters())
            return out.loss.detach()

        return run

    return step(matrix, x), step(factors, kv)


class InlineWriteSAE(torch.nn.Module):
    """The ``writesae`` computations of ``writesae_lens.saes`` (default training config: bilinear
    encoder, rank-1 decoder, TopK, ``rescale_acts_by_decoder_norm=True``, ``apply_b_dec_to_input=True``,
    fixed ``b_dec``, no dead atoms), written out for a machine without SAELens. Benchmark use only."""

    def __init__(self, d_k: int, d_v: int, d_sae: int, k: int, device: str):
        super().__init__()
        self.d_k, self.d_v, self.k = d_k, d_v, k
        kw = dict(device=device)
        u, w = torch.randn(d_sae, d_k, **kw), torch.randn(d_sae, d_v, **kw)
        self.U_dec = torch.nn.Parameter(u / u.norm(dim=-1, keepdim=True) * 0.1**0.5)
        self.V_dec = torch.nn.Parameter(w / w.norm(dim=-1, keepdim=True) * 0.1**0.5)
        self.A_enc = torch.nn.Parameter(self.U_dec.detach().clone())
        self.B_enc = torch.nn.Parameter(self.V_dec.detach().clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae, **kw))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_k * d_v, **kw), requires_grad=False)

    @classmethod
    def from_library(cls, sae: Any) -> "InlineWriteSAE":
        cfg = sae.cfg
        new = cls(cfg.d_k, cfg.d_v, cfg.d_sae, int(cfg.k), str(sae.device))
        with torch.no_grad():
            for name in ("U_dec", "V_dec", "A_enc", "B_enc", "b_enc", "b_dec"):
                getattr(new, name).copy_(getattr(sae, name))
        return new

    def atom_norms(self) -> torch.Tensor:
        return self.U_dec.norm(dim=-1) * self.V_dec.norm(dim=-1)

    def materialised_loss(self, x: torch.Tensor) -> torch.Tensor:
        xm = (x - self.b_dec).unflatten(-1, (self.d_k, self.d_v))
        pre = (((xm @ self.B_enc.T) * self.A_enc.T).sum(dim=-2) + self.b_enc) * self.atom_norms()
        top = torch.topk(pre, k=self.k, dim=-1, sorted=False)
        acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        acts = acts / self.atom_norms().clamp(min=1e-8)
        n_active = int((acts != 0).sum(-1).max())  # as the library's decode_atoms (a host sync)
        if 0 < n_active * 4 <= acts.shape[-1]:
            values, index = acts.topk(n_active, dim=-1)
            recon = (values[..., :, None] * self.U_dec[index]).transpose(-1, -2) @ self.V_dec[index]
        else:
            recon = (acts[..., :, None] * self.U_dec).transpose(-1, -2) @ self.V_dec
        return (recon.flatten(-2) + self.b_dec - x).pow(2).sum(-1).mean()

    def factored_loss(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        a, b, u, w = self.A_enc, self.B_enc, self.U_dec, self.V_dec
        bias = self.b_dec.view(self.d_k, self.d_v)
        norms = self.atom_norms()
        pre = ((k @ a.T) * (v @ b.T) + self.b_enc - ((a @ bias) * b).sum(-1)) * norms
        top = torch.topk(pre, k=self.k, dim=-1, sorted=False)
        index = top.indices
        values = top.values.relu() / norms.clamp(min=1e-8)[index]
        u_a, w_a = u[index], w[index]  # [batch, k, d_k], [batch, k, d_v]: each row's active atoms
        gram = (u_a @ u_a.transpose(-1, -2)) * (w_a @ w_a.transpose(-1, -2))
        quad = ((gram @ values[..., None]).squeeze(-1) * values).sum(-1)
        cross = (values * (u_a @ k[..., None]).squeeze(-1) * (w_a @ v[..., None]).squeeze(-1)).sum(-1)
        atom_dot_bias = ((u @ bias) * w).sum(-1)[index]
        err = k.pow(2).sum(-1) * v.pow(2).sum(-1) + quad - 2 * cross
        err = err + bias.pow(2).sum() - 2 * ((k @ bias) * v).sum(-1) + 2 * (values * atom_dot_bias).sum(-1)
        return err.mean()


def inline_paths(sae: InlineWriteSAE, k: torch.Tensor, v: torch.Tensor):
    x = (k[:, :, None] * v[:, None, :]).flatten(1)

    def materialised():
        loss = sae.materialised_loss(x)
        loss.backward()
        _zero(sae.parameters())
        return loss.detach()

    def factored():
        loss = sae.factored_loss(k, v)
        loss.backward()
        _zero(sae.parameters())
        return loss.detach()

    return materialised, factored


def factored_case(device: str, dead_half: bool = False, batch: int = BATCH) -> tuple[Any, Any, str]:
    """``(materialised step, factored step, implementation)`` for benchmark (b) (also used by mem_probe)."""
    k, v = rank1_inputs(batch, D_K, D_V, device, seed=1)
    if sae_lens_available():
        dead = torch.zeros(D_SAE, dtype=torch.bool, device=device)
        if dead_half:
            dead[::2] = True
        matrix, factors = library_saes(device)
        return (*library_paths(matrix, factors, k, v, dead), "writesae_lens.saes.WriteTrainingSAE.training_forward_pass")
    if dead_half:
        raise RuntimeError("the inline re-implementation has no aux loss")
    torch.manual_seed(0)
    return (*inline_paths(InlineWriteSAE(D_K, D_V, D_SAE, K, device), k, v), "InlineWriteSAE (SAELens not installed here)")


def profile_top(fn: Any, settings: Settings, n: int = 6) -> list[str]:
    """The ``n`` most expensive operators of one call of ``fn`` (self time), as short strings."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if settings.cuda else [])
    fn()
    with profile(activities=activities) as prof:
        fn()
        settings.sync()
    key = "self_cuda_time_total" if settings.cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key.replace("cuda", "device"), 0) or getattr(e, key, 0), reverse=True)
    total = sum((getattr(e, key.replace("cuda", "device"), 0) or getattr(e, key, 0)) for e in events) or 1
    out = []
    for e in events[:n]:
        t = getattr(e, key.replace("cuda", "device"), 0) or getattr(e, key, 0)
        out.append(f"{e.key} {100 * t / total:.0f}% ({t / 1e3:.1f} ms, x{e.count})")
    return out


def run_factored(settings: Settings) -> None:
    case = f"writesae factored vs materialised training step, d_k=d_v={D_K}, d_sae={D_SAE}, k={K}, batch {BATCH}"
    if sae_lens_available():
        # The inline copy must compute the same losses (it stands in for the library on the GPU).
        k, v = rank1_inputs(BATCH, D_K, D_V, settings.device, seed=1)
        matrix, _ = library_saes(settings.device)
        lib_m, lib_f, _ = factored_case(settings.device)
        inline_m, inline_f = inline_paths(InlineWriteSAE.from_library(matrix), k, v)
        checks = {"lib_materialised": lib_m().item(), "lib_factored": lib_f().item(),
                  "inline_materialised": inline_m().item(), "inline_factored": inline_f().item()}
        compare(settings, bench="4 sae", case=f"inline check: {case} (inline re-implementation, CPU only)",
                reference=("inline materialised", inline_m), candidate=("inline factored", inline_f),
                tokens=BATCH, max_rounds=7, extra=dict(losses=checks))
    else:
        settings.note("4 sae: SAELens is not importable here; the factored-path rows use the inline "
                      "re-implementation InlineWriteSAE (checked equal to the library on CPU).")
    # On the GPU batch 256 is launch-bound on both sides: also measure a batch that fills the device.
    cases = [(BATCH, False), (BATCH, True)] + ([(4096, False)] if settings.cuda else [])
    for batch, dead_half in cases:
        if dead_half and not sae_lens_available():
            settings.note("4 sae: the aux-loss row needs the library (SAELens); skipped.")
            continue
        materialised, factored, impl = factored_case(settings.device, dead_half, batch)
        lm, lf = materialised().item(), factored().item()
        label = "half the atoms dead (aux loss on)" if dead_half else "no dead atoms"
        mems = {path: mib(measure_peak(settings, dict(kind="sae_path", batch=batch, path=path, dead_half=dead_half), fn)["peak_bytes"])
                for path, fn in (("materialised", materialised), ("factored", factored))}
        headline = batch == BATCH and not dead_half
        compare(settings, bench="4 sae", case=f"{case.replace(f'batch {BATCH}', f'batch {batch}')}, {label}",
                reference=("materialised: training_forward_pass on vec(k v^T), backward", materialised),
                candidate=("factored: training_forward_pass on [k | v], backward", factored),
                tokens=batch, target=TARGET_FACTORED if headline else None,
                target_check=(lambda r: r >= 10) if headline else None, max_rounds=15,
                extra=dict(implementation=impl, loss_materialised=lm, loss_factored=lf,
                           loss_rel_diff=abs(lm - lf) / max(abs(lm), 1e-12),
                           peak_mib_materialised=mems["materialised"], peak_mib_factored=mems["factored"],
                           profile_factored=profile_top(factored, settings),
                           profile_materialised=profile_top(materialised, settings)))


def run(settings: Settings) -> None:
    if sae_lens_available():
        run_architectures(settings)
    else:
        settings.note("4 sae (a): per-architecture training steps skipped: SAELens is not importable here.")
    run_factored(settings)
