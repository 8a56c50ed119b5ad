"""The paper's dictionary comparison on one site, as one call and one command.

``compare_dictionaries(model, dataset, layer, head, site, budget=N)`` (CLI: ``writesae compare --model
M --layer L --head H --site state|write --budget N``) samples the head's inputs once (the recipe's fixed
set: :func:`writesae_lens.recipe.cache_site`, 80/20 by sequence, seed 42, bf16-cast) and fits on the same
training inputs, with the same number ``N`` of atoms and ``k`` active per token:

- ``topk``: SAELens's own TopK SAE (dense encoder, flat decoder; the paper's FlatSAE);
- ``writesae_matrix`` (dense encoder, rank-1 atoms), ``writesae_bilinear`` (bilinear encoder, flat
  atoms), ``writesae`` (bilinear, rank-1) and ``writesae_tied`` (``writesae`` with ``tied=True``),
  all through :func:`writesae_lens.training.build_runner` with the paper's recipe;
- ``svd`` / ``pca``: scikit-learn's ``TruncatedSVD`` / ``PCA`` of the training inputs at rank ``k``
  (every method spends ``k`` coefficients per token; ``svd_rank`` changes it).

and reports per method, on the held-out 20%: parameters, FVU (``sum ||x - x^||^2 / sum ||x - mean||^2``)
and explained variance, L0, dead fraction (atoms that never fire on held-out), the downstream
perplexity change with the dictionary spliced into its head (:mod:`writesae_lens.downstream`, on the
held-out sequences: first half context, second half scored), the substitution test's win rate (atom
beats deleting the write; ``run_substitution_test`` on the held-out sequences) and the mean over
alive atoms of each atom's median cosine to the native write at its firings (the register axis of
the paper's partition). Baselines have no atoms: those columns are empty.

Resumable: each finished method's row goes to ``<out_dir>/rows/<method>.json`` (written atomically);
a rerun with the same settings skips them. ``--json PATH`` writes all rows, ``--plot PATH`` FVU against
parameters (matplotlib).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from jaxtyping import Float, Int
from sae_lens import SAE
from torch import Tensor
from tqdm.auto import tqdm

from hooked_ssm import HookedSSM
from writesae_lens.downstream import HeadReplacement, downstream_costs
from writesae_lens.recipe import PAPER_RECIPE, SiteCache, TrainingRecipe
from writesae_lens.training import Site, build_runner, sample_site, site_hook_name

# method -> (architecture, SAE config overrides)
SAE_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "topk": ("topk", {}),
    "writesae_matrix": ("writesae_matrix", {}),
    "writesae_bilinear": ("writesae_bilinear", {}),
    "writesae": ("writesae", {}),
    # A tied encoder is its decoder, so SAELens's input scaling cannot be folded back out: raw inputs.
    "writesae_tied": ("writesae", {"tied": True, "normalize_activations": "none"}),
}
BASELINES = ("svd", "pca")
METHODS = (*SAE_METHODS, *BASELINES)
# Not in the paper's comparison table, on request (--methods): the rank-2 decoder control (App. F.3).
EXTRA_SAE_METHODS: dict[str, tuple[str, dict[str, Any]]] = {"writesae_rank2": ("writesae_rank_r", {"rank": 2})}
SAE_METHODS.update(EXTRA_SAE_METHODS)
ALL_METHODS = (*METHODS, *EXTRA_SAE_METHODS)

# The paper's numbers for Qwen3.5-0.8B: validation MSE x1e-5 at layer 9 (Table 7, 16-head average) and
# downstream perplexity change at L9 H4 (released checkpoints, METHOD.md section 8).
PAPER_COLUMNS: dict[str, dict[str, float]] = {
    "topk": {"val_mse_1e-5": 2.58, "ppl_change": 0.0331},
    "writesae_matrix": {"val_mse_1e-5": 2.69, "ppl_change": 0.1118},
    "writesae": {"val_mse_1e-5": 3.09, "ppl_change": 0.0058},
    "writesae_bilinear": {"val_mse_1e-5": 3.35, "ppl_change": 0.0133},
    "writesae_tied": {"val_mse_1e-5": 5.98},
}


@dataclass
class ComparisonSettings:
    """Everything that decides a comparison's numbers (recorded in ``<out_dir>/settings.json``)."""

    layer: int
    head: int
    site: Site = "write"
    budget: int = 256  # atoms per dictionary
    k: int = 16  # active atoms per token (and the SVD / PCA rank unless svd_rank)
    svd_rank: int | None = None
    epochs: float = PAPER_RECIPE.epochs
    n_sequences: int | None = 48  # context windows sampled once (None: every window of the dataset)
    context_size: int = 128
    lr: float = 3e-4
    train_batch_size_tokens: int = 256
    substitution_firings: int = 60
    seed: int = 42
    methods: Sequence[str] = METHODS

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown:
            raise ValueError(f"Unknown method(s) {unknown}; choose from {list(ALL_METHODS)}.")
        self.methods = list(self.methods)

    @property
    def rank(self) -> int:
        return self.svd_rank or self.k


@dataclass
class HeldOut:
    """The held-out split: inputs, their token windows and the native writes at the same positions."""

    inputs: Float[Tensor, "tokens d_in"]
    tokens: Int[Tensor, "window pos"]
    writes: Float[Tensor, "tokens dk_dv"]


# ---------------------------------------------------------------- metrics
def fvu(inputs: Float[Tensor, "n d"], recon: Float[Tensor, "n d"]) -> float:
    """Fraction of variance unexplained: ``sum ||x - x^||^2 / sum ||x - mean(x)||^2`` (float64)."""
    x, r = inputs.double(), recon.double()
    return float((x - r).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


@torch.no_grad()
def sae_codes_and_recon(sae: SAE, inputs: Tensor, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    codes, recons = [], []
    for part in inputs.split(chunk):
        c = sae.encode(part.to(sae.dtype))
        codes.append(c)
        recons.append(sae.decode(c).float())
    return torch.cat(codes), torch.cat(recons)


def atom_write_cosine(sae: SAE, codes: Tensor, writes: Tensor, d_k: int, d_v: int, min_firings: int = 5) -> float:
    """Mean over atoms with ``min_firings`` held-out firings of each one's median cosine to the native
    write at its firings (:func:`writesae_lens.analysis.partition.atom_write_cosines`)."""
    from writesae_lens.analysis.partition import atom_write_cosines

    atoms, cos = atom_write_cosines(sae, codes, writes, d_k, d_v)
    medians = [np.median(cos[atoms == a]) for a in np.unique(atoms) if (atoms == a).sum() >= min_firings]
    return float(np.mean(medians)) if medians else math.nan


def substitution_win_rate(model: HookedSSM, sae: SAE, layer: int, head: int, tokens: Tensor, n_firings: int) -> float:
    """The substitution test's win rate (atom beats deletion) at ``n_firings`` firings of the held-out windows."""
    from writesae_lens.interventions.substitution import run_substitution_test

    _, summary = run_substitution_test(model, sae, layer, head, tokens, max_firings=n_firings, progress=False)
    return float(summary.get("win_rate", math.nan))


# ---------------------------------------------------------------- baselines
@dataclass
class Projection:
    """A rank-``r`` linear reconstruction ``x -> (x - c) V V^T + c`` (``c`` = 0 for truncated SVD)."""

    components: Float[Tensor, "r d"]
    center: Float[Tensor, " d"]
    n_parameters: int

    def __call__(self, x: Tensor) -> Tensor:
        c, v = self.center.to(x), self.components.to(x)
        return (x - c) @ v.T @ v + c


def fit_projection(method: str, train: Tensor, rank: int, seed: int) -> Projection:
    """scikit-learn's ``TruncatedSVD`` (uncentred) or ``PCA`` (centred) at ``rank``."""
    from sklearn.decomposition import PCA, TruncatedSVD

    x = train.double().numpy()
    if method == "svd":
        fit = TruncatedSVD(n_components=rank, algorithm="arpack", random_state=seed).fit(x)
        center, n = np.zeros(x.shape[1]), rank * x.shape[1]
    elif method == "pca":
        fit = PCA(n_components=rank, svd_solver="arpack", random_state=seed).fit(x)
        center, n = fit.mean_, rank * x.shape[1] + x.shape[1]
    else:
        raise ValueError(f"Unknown baseline {method!r}; choose from {BASELINES}.")
    components = torch.from_numpy(np.ascontiguousarray(fit.components_)).float()
    return Projection(components, torch.from_numpy(np.ascontiguousarray(center)).float(), n)


# ---------------------------------------------------------------- the comparison
@dataclass
class Comparison:
    """A resumable comparison in ``out_dir`` (see the module docstring)."""

    model: HookedSSM
    dataset: Dataset
    settings: ComparisonSettings
    out_dir: Path
    progress: bool = True
    recipe: TrainingRecipe = field(init=False)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.recipe = dataclasses.replace(PAPER_RECIPE, epochs=self.settings.epochs, split_seed=self.settings.seed)
        self._check_settings()

    def _check_settings(self) -> None:
        saved = self.out_dir / "settings.json"
        mine = _settings_key(self.settings)
        if saved.is_file() and json.loads(saved.read_text()) != mine:
            raise ValueError(
                f"{self.out_dir} holds a comparison with other settings ({saved}); use a fresh --out-dir or the "
                f"same settings to resume it."
            )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomically(saved, mine)

    def row_path(self, method: str) -> Path:
        return self.out_dir / "rows" / f"{method}.json"

    def run(self) -> list[dict[str, Any]]:
        s = self.settings
        cache = self._cache()
        heldout = self._heldout(cache)
        rows = []
        for method in tqdm(s.methods, desc="compare", disable=not self.progress):
            path = self.row_path(method)
            if not path.is_file():
                row = self._evaluate(method, cache, heldout)
                _write_json_atomically(path, row)
            rows.append(json.loads(path.read_text()))
        return rows

    # ------------------------------------------------------------ data
    def _runner(self, method: str, cache: SiteCache) -> Any:
        s = self.settings
        architecture, overrides = SAE_METHODS[method]
        return build_runner(
            self.model, self.dataset, s.layer, s.head, s.site, recipe=self.recipe, site_cache=cache,
            architecture=architecture, sae_overrides=overrides or None, factored=False,
            d_sae=s.budget, k=s.k, context_size=s.context_size, lr=s.lr, train_batch_size_tokens=s.train_batch_size_tokens,
            output_path=str(self.out_dir / "saes" / method), seed=s.seed,
        )

    def _cache(self) -> SiteCache:
        s = self.settings
        return sample_site(
            self.model, self.dataset, s.layer, s.head, s.site, self.out_dir / "inputs", self.recipe, s.n_sequences,
            factored=False, context_size=s.context_size, train_batch_size_tokens=s.train_batch_size_tokens,
        )

    @torch.no_grad()
    def _heldout(self, cache: SiteCache) -> HeldOut:
        import datasets

        tokens = torch.tensor(datasets.load_from_disk(str(cache.split_path("heldout")))[:]["token_ids"]).long()
        write_hook = site_hook_name(self.settings.layer, "write")
        writes = []
        for batch in tokens.split(8):
            _, acts = self.model.run_with_cache(batch.to(self.model.cfg.device), names_filter=write_hook)
            writes.append(acts[write_hook][:, :, self.settings.head].flatten(0, 1).flatten(1).float().cpu())
        return HeldOut(cache.load("heldout"), tokens, torch.cat(writes))

    # ------------------------------------------------------------ one method
    def _evaluate(self, method: str, cache: SiteCache, heldout: HeldOut) -> dict[str, Any]:
        s, start = self.settings, time.perf_counter()
        hook = site_hook_name(s.layer, s.site)
        if method in BASELINES:
            projection = fit_projection(method, cache.load("train"), s.rank, s.seed)
            recon = projection(heldout.inputs)
            replacement: Any = HeadReplacement(hook, s.head, projection)
            row = dict(parameters=projection.n_parameters, l0=float(s.rank), dead_fraction=None,
                       substitution_win_rate=None, atom_write_cos=None)
        else:
            torch.manual_seed(s.seed)
            sae = self._runner(method, cache).run().eval()
            codes, recon = sae_codes_and_recon(sae, heldout.inputs)
            replacement = sae
            row = dict(
                parameters=sum(p.numel() for p in sae.parameters()),
                l0=float((codes > 0).sum(-1).float().mean()),
                dead_fraction=float(((codes > 0).sum(0) == 0).float().mean()),
                substitution_win_rate=self._win_rate(sae, heldout),
                atom_write_cos=atom_write_cosine(sae, codes, heldout.writes, self.model.cfg.d_k, self.model.cfg.d_v),
            )
        train_seconds = time.perf_counter() - start
        value = fvu(heldout.inputs, recon)
        cost = downstream_costs(self.model, [replacement], heldout.tokens, progress=False)[0]
        return dict(
            method=method, site=hook, head=s.head, budget=s.budget, k=s.k, **row, fvu=value,
            explained_variance=1 - value, ppl_change=cost.ppl_change, clean_loss=cost.clean_loss,
            spliced_loss=cost.spliced_loss, fit_seconds=round(train_seconds, 1),
        )

    def _win_rate(self, sae: SAE, heldout: HeldOut) -> float | None:
        s = self.settings
        if not s.substitution_firings:
            return None
        try:
            return substitution_win_rate(self.model, sae, s.layer, s.head, heldout.tokens, s.substitution_firings)
        except ValueError as err:  # e.g. no firing of any atom on the held-out windows
            tqdm.write(f"substitution test skipped: {err}")
            return None


def compare_dictionaries(
    model: HookedSSM, dataset: Dataset, layer: int, head: int, site: Site = "write", budget: int = 256,
    out_dir: str | Path | None = None, progress: bool = True, **settings: Any,
) -> list[dict[str, Any]]:
    """Run the comparison (module docstring); one row per method. ``settings``: the fields of
    :class:`ComparisonSettings` (``k``, ``epochs``, ``n_sequences``, ``methods``, ...). ``out_dir``
    (default: a new temporary folder) makes it resumable."""
    cfg = ComparisonSettings(layer=layer, head=head, site=site, budget=budget, **settings)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="writesae-compare-"))
    return Comparison(model, dataset, cfg, out, progress).run()


def _settings_key(settings: ComparisonSettings) -> dict[str, Any]:
    key = dataclasses.asdict(settings)
    key.pop("methods")  # adding methods to a finished comparison is fine
    return key


def _write_json_atomically(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


# ---------------------------------------------------------------- report
def format_table(rows: Sequence[dict[str, Any]], paper: bool = True) -> str:
    def cell(value: Any, fmt: str) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)

    header = (f"{'method':<18} {'params':>10} {'FVU':>7} {'expl.var':>8} {'L0':>6} {'dead':>6} {'ppl chg':>8} "
              f"{'subst.win':>9} {'atom cos':>8}")
    if paper:
        header += f" | {'paper MSE':>9} {'paper ppl':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        line = (f"{r['method']:<18} {r['parameters']:>10,} {cell(r['fvu'], '.4f'):>7} {cell(r['explained_variance'], '.4f'):>8} "
                f"{cell(r['l0'], '.1f'):>6} {cell(r['dead_fraction'], '.1%'):>6} {cell(r['ppl_change'], '+.2%'):>8} "
                f"{cell(r['substitution_win_rate'], '.1%'):>9} {cell(r['atom_write_cos'], '.3f'):>8}")
        if paper:
            ref = PAPER_COLUMNS.get(r["method"], {})
            line += f" | {cell(ref.get('val_mse_1e-5'), '.2f'):>9} {cell(ref.get('ppl_change'), '+.2%'):>9}"
        lines.append(line)
    return "\n".join(lines)


def plot_fvu_vs_parameters(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """FVU against parameter count, one labelled point per method (log x axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["parameters"], r["fvu"])
        ax.annotate(r["method"], (r["parameters"], r["fvu"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("held-out FVU")
    ax.set_title(f"{rows[0]['site']} head {rows[0]['head']}: {rows[0]['budget']} atoms, k={rows[0]['k']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- CLI: writesae compare
def toy_training_dataset(model: HookedSSM, context_size: int) -> Dataset:
    """The bundled toy corpus's train split as ``context_size``-token windows (documents joined with BOS)."""
    from writesae_lens.demo import corpus_windows

    return Dataset.from_dict({"input_ids": corpus_windows(model, "train", context_size).tolist()})


def _site(args: argparse.Namespace) -> tuple[int, int]:
    """``(layer, head)``: as given, else those of the bundled release of a toy ``--model``."""
    if args.layer is not None and args.head is not None:
        return args.layer, args.head
    from writesae_lens.demo import toy_site

    try:
        layer, head = toy_site(args.model)
    except FileNotFoundError as err:
        raise ValueError(f"{args.model!r} has no bundled release to take a site from; pass --layer and --head.") from err
    return (layer if args.layer is None else args.layer), (head if args.head is None else args.head)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="toy-gdn", help="bundled toy name or checkpoint directory (default: toy-gdn)")
    p.add_argument("--layer", type=int, default=None, help="default: the bundled toy's release layer (toy-gdn: 1)")
    p.add_argument("--head", type=int, default=None, help="default: the bundled toy's release head (toy-gdn: 1)")
    p.add_argument("--site", choices=["write", "state"], default="write")
    p.add_argument("--budget", type=int, default=256, help="atoms per dictionary (default 256)")
    p.add_argument("--k", type=int, default=16, help="active atoms per token; also the SVD / PCA rank (default 16)")
    p.add_argument("--svd-rank", type=int, default=None, help="SVD / PCA rank (default: --k)")
    p.add_argument("--epochs", type=float, default=PAPER_RECIPE.epochs, help="epochs over the fixed set (paper: 20)")
    p.add_argument("--n-sequences", type=int, default=48, help="context windows sampled once (80/20 split)")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (paper: 3e-4 on 5M states)")
    p.add_argument("--batch-size", type=int, default=256, help="training batch in tokens (paper: 256)")
    p.add_argument("--substitution-firings", type=int, default=60, help="firings for the substitution test (0: skip)")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(ALL_METHODS),
                   help="default: the paper's seven; writesae_rank2 on request")
    p.add_argument("--out-dir", default="writesae-compare", help="resumable working folder")
    p.add_argument("--json", default=None, help="write one row per method to this JSON file")
    p.add_argument("--plot", default=None, help="save FVU vs parameters to this image (matplotlib)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import writesae_lens  # noqa: F401  (registers the architectures)

    model = HookedSSM.from_pretrained(args.model, device=args.device)
    rows = compare_dictionaries(
        model, toy_training_dataset(model, args.context_size), *_site(args), args.site, args.budget,
        out_dir=args.out_dir, progress=not args.quiet, k=args.k, svd_rank=args.svd_rank, epochs=args.epochs,
        n_sequences=args.n_sequences, context_size=args.context_size, lr=args.lr, train_batch_size_tokens=args.batch_size,
        substitution_firings=args.substitution_firings, methods=args.methods, seed=args.seed,
    )
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
        print(f"rows -> {args.json}")
    if args.plot:
        plot_fvu_vs_parameters(rows, args.plot)
        print(f"plot -> {args.plot}")
    return 0



__all__ = [
    "ALL_METHODS", "BASELINES", "METHODS", "PAPER_COLUMNS", "SAE_METHODS", "Comparison", "ComparisonSettings", "Projection",
    "compare_dictionaries", "fit_projection", "format_table", "fvu", "plot_fvu_vs_parameters",
]
