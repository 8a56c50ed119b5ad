"""The ``writesae`` command: the paper's experiments from a shell.

    writesae substitute  --sae DIR_OR_RELEASE/ID [--model toy-gdn] [--layer L --head H] [--text FILE] [--out rows.jsonl]
    writesae logit-shift --sae ... [--eps 0.1 0.3 1 3] [--horizon 4]
    writesae steer       [--sae ...] [--layer L --head H] [--multipliers 1.5 3 6]  (sustained installs + sign prediction)
    writesae erase       --sae ... --feature I
    writesae amplify     --sae ... [--doses 1 2 5 10]
    writesae partition   --sae ...
    writesae oracle      [--sae ...] [--layer L --head H] [--cosines 0.5 0.9 0.99] [--side both|key|value]
    writesae demo        (the toy GDN + its bundled SAE; see ``writesae_lens.demo`` when present)

Every subcommand loads ``--model`` (a bundled toy name, a local checkpoint directory or a Hub id;
default ``toy-gdn``), cuts ``--text`` (files; default: the bundled toy corpus's validation split)
into ``--n-windows`` windows of ``--context-size`` tokens, prints a paper-style table (each
statistic named as the paper defines it, beside the paper's value and the model/layer it is for)
and, with ``--out``, writes the rows (JSONL) and ``<out>.summary.json``; ``--json PATH`` writes the
summary to ``PATH`` (every subcommand, ``demo`` included).

``--sae`` is a directory in SAELens's format (``cfg.json`` + ``sae_weights.safetensors``, loaded
with ``SAE.load_from_disk``) or ``release/sae_id`` for ``SAE.from_pretrained`` (or ``--sae RELEASE
--sae-id ID``). Layer and head default to the SAE's ``hook_name`` / ``hook_head_index``.

Subcommands are registered in :data:`SUBCOMMANDS` (name -> (add_arguments, run)); a module can
add one with :func:`register_subcommand`.

Results files record what made them (:mod:`writesae_lens.run_record`): ``--resume`` continues a
file only when the new run's settings, model, SAE, data and versions equal the file's record.
Errors: a bad argument or a failure prints one line (``writesae <command>: error: ...``) and exits
non-zero; ``--debug`` shows the traceback instead. This module imports nothing heavy at the top,
and the ``writesae`` script (:mod:`writesae_cli`) loads it without the package's ``__init__``, so
``writesae --help`` answers without importing torch or sae_lens.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports stay inside the subcommands: `writesae --help` loads no torch
    import torch
    from sae_lens import SAE

    from hooked_ssm import HookedSSM

SubcommandRun = Callable[[argparse.Namespace], int]
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], SubcommandRun]] = {}


def register_subcommand(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None], run: SubcommandRun) -> None:
    """Add (or replace) a ``writesae <name>`` subcommand."""
    SUBCOMMANDS[name] = (help, add_arguments, run)


# ---------------------------------------------------------------- shared loading
# ---------------------------------------------------------------- argument types
def firing_or_position(value: str) -> str | int:
    """``--t0``: ``firing`` or a non-negative integer position."""
    if value == "firing":
        return value
    try:
        position = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'firing' or an integer position, got {value!r}") from None
    if position < 0:
        raise argparse.ArgumentTypeError(f"a position is >= 0, got {position}")
    return position


def erasure_target(value: str) -> str | int:
    """``--target``: ``detected`` or a token id."""
    if value == "detected":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'detected' or a token id, got {value!r}") from None


def load_model(name: str, device: str | None = None, dtype: str | None = None) -> HookedSSM:
    """``--dtype`` names are parsed by ``from_pretrained`` (an unknown one lists the valid names)."""
    from hooked_ssm import HookedSSM

    return HookedSSM.from_pretrained(name, device=device, dtype=dtype)


def load_sae(spec: str, sae_id: str | None = None, device: str = "cpu") -> SAE:
    """An SAE from a local directory, ``release/sae_id``, or ``release`` + ``sae_id`` (checked loaders:
    a truncated file, a release without an id or an unknown id get a clear error)."""
    from writesae_lens.loading import load_sae as load

    return load(spec, sae_id, device)


def load_tokens(model: HookedSSM, args: argparse.Namespace) -> torch.Tensor:
    from writesae_lens.interventions.tokens import token_windows, toy_validation_texts

    if args.text:
        texts = [Path(p).read_text(encoding="utf-8") for p in args.text]
    else:
        texts = toy_validation_texts()
    return token_windows(model, texts, args.context_size, args.n_windows)


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default=None, metavar="PATH", help="write the summary (JSON) to PATH")


def write_summary_json(path: str | None, summary: dict) -> None:
    """``--json PATH``: the summary as JSON (nothing when ``path`` is None)."""
    from writesae_lens.analysis.report import write_json

    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json(path, summary)
        print(f"summary -> {path}")


def _common(parser: argparse.ArgumentParser, sae: bool = True, context_size: int = 256, n_windows: int = 32) -> None:
    parser.add_argument("--model", default="toy-gdn", help="bundled toy name, checkpoint directory or Hub id (default: toy-gdn)")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda (default: the model's default)")
    parser.add_argument("--dtype", default=None, help="e.g. float32, bfloat16")
    if sae:
        parser.add_argument("--sae", required=True, help="SAE directory (cfg.json + sae_weights.safetensors) or release/sae_id")
        parser.add_argument("--sae-id", default=None, help="SAE id within the release given by --sae")
    parser.add_argument("--layer", type=int, default=None, help="default: the SAE's layer")
    parser.add_argument("--head", type=int, default=None, help="default: the SAE's head")
    parser.add_argument("--text", nargs="*", default=None, help="text files (default: the toy corpus validation split)")
    parser.add_argument("--context-size", type=int, default=context_size)
    parser.add_argument("--n-windows", type=int, default=n_windows, help="number of token windows to use")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="results file (JSONL); the summary goes to <out>.summary.json")
    add_json_argument(parser)
    parser.add_argument("--no-paper", action="store_true", help="do not print the paper's column")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _setup(args: argparse.Namespace, sae: bool = True) -> tuple[HookedSSM, SAE | None, torch.Tensor]:
    model = load_model(args.model, args.device, args.dtype)
    dictionary = load_sae(args.sae, args.sae_id, str(model.cfg.device)) if sae else None
    return model, dictionary, load_tokens(model, args)


# Arguments that change how a run is shown or how fast it runs, not what its rows hold.
_NOT_RECORDED = {"out", "json", "resume", "quiet", "debug", "no_paper", "batch_size", "device", "_run"}


def _recorded(args: argparse.Namespace) -> dict[str, object]:
    """The arguments that decide a run's rows, as recorded in its results file (``--`` names)."""
    return {f"--{k.replace('_', '-')}": v for k, v in vars(args).items() if k not in _NOT_RECORDED}


def _save(args: argparse.Namespace, rows: Sequence[dict] | None, summary: dict, model: HookedSSM,
          sae: SAE | None = None, stream: bool = False) -> None:
    """Write ``--json``, ``--out`` (the rows headed by the run's record) and ``<out>.summary.json``
    (with the record). ``stream``: the protocol already wrote its rows and record as they completed."""
    from writesae_lens.analysis.report import write_json
    from writesae_lens.run_record import ResultsFile, run_record

    if not stream:
        summary = {**summary, "run": run_record(args.command, _recorded(args), model=model, sae=sae,
                                                seed=getattr(args, "seed", None))}
    write_summary_json(args.json, summary)
    if not args.out:
        return
    out = Path(args.out)
    if not stream:
        ResultsFile(out, summary["run"]).append(rows or [])
    write_json(out.with_name(out.name + ".summary.json"), summary)
    print(f"\nrows -> {out}\nsummary -> {out.with_name(out.name + '.summary.json')}")


# ---------------------------------------------------------------- substitute
def _substitute_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--scale", choices=["native_norm", "coefficient"], default="native_norm",
                   help="atom scale: the native write's Frobenius norm (App. J) or the firing coefficient (section 2)")
    p.add_argument("--score", choices=["last", "next", "mean_after", "current"], default="last",
                   help="headline position: the window's last (t+1 is reported beside it), t+1, the mean after t, or t")
    p.add_argument("--horizon", type=int, default=None, help="window end = t + horizon (default: end of the window)")
    p.add_argument("--selection", choices=["feature", "dominant"], default="feature",
                   help="feature i's own atom at i's firings (paper), or the largest code's atom per position")
    p.add_argument("--random-control", choices=["auto", "atom", "gaussian", "native"], default="auto",
                   help="a silent feature's atom; Gaussian rank-1; an empirical native write (auto: native on Mamba-2)")
    p.add_argument("--kl-direction", choices=["patched_base", "base_patched"], default="patched_base",
                   help="KL(p_patched || p_base) (paper) or KL(p_base || p_patched) (the authors' script)")
    p.add_argument("--max-firings", type=int, default=2000)
    p.add_argument("--min-firings-per-atom", type=int, default=5)
    p.add_argument("--max-per-atom", type=int, default=30)
    p.add_argument("--min-position", type=int, default=1)
    p.add_argument("--method", choices=["fast", "naive"], default="fast")
    p.add_argument("--resume", action="store_true",
                   help="skip firings already in --out (refused if --out was made with other settings)")


def _substitute(args: argparse.Namespace) -> int:
    from writesae_lens.analysis.report import format_summary_table
    from writesae_lens.interventions.substitution import run_substitution_test

    model, sae, tokens = _setup(args)
    rows, summary = run_substitution_test(
        model, sae, args.layer, args.head, tokens, scale=args.scale, score=args.score, horizon=args.horizon,
        selection=args.selection, random_control=args.random_control, kl_direction=args.kl_direction,
        method=args.method, min_position=args.min_position, max_firings=args.max_firings,
        min_firings_per_atom=args.min_firings_per_atom, max_per_atom=args.max_per_atom, batch_size=args.batch_size,
        seed=args.seed, out=args.out, resume=args.resume, progress=not args.quiet, provenance=_recorded(args),
    )
    summary["config"]["model"] = args.model
    print(format_summary_table(summary, paper=None if args.no_paper else _paper_substitution(model)))
    _save(args, rows, summary, model, sae, stream=True)
    return 0


def _paper_substitution(model: HookedSSM) -> dict:
    from writesae_lens.analysis.report import PAPER_SUBSTITUTION, PAPER_SUBSTITUTION_MAMBA2

    return PAPER_SUBSTITUTION_MAMBA2 if "mamba2" in model.cfg.layer_types else PAPER_SUBSTITUTION


# ---------------------------------------------------------------- logit-shift
def _logit_shift_args(p: argparse.ArgumentParser) -> None:
    _common(p, context_size=64, n_windows=16)
    p.add_argument("--atoms", type=int, nargs="*", default=None, help="atoms to audit (default: the most frequent)")
    p.add_argument("--n-atoms", type=int, default=20)
    p.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0])
    p.add_argument("--eps-unit", choices=["native_norm", "absolute"], default="native_norm")
    p.add_argument("--horizon", type=int, default=4)
    p.add_argument("--t0", type=firing_or_position, default="firing", help="'firing' or a position (an integer)")
    p.add_argument("--token-ranks", type=int, nargs="+", default=[0])
    p.add_argument("--forms", nargs="+", default=["gate", "jvp", "fitted"], choices=["gate", "jvp", "fitted"])
    p.add_argument("--max-prompts-per-atom", type=int, default=None)


def _logit_shift(args: argparse.Namespace) -> int:
    from writesae_lens.analysis.report import format_logit_shift_table
    from writesae_lens.interventions.logit_shift import run_logit_shift_audit

    model, sae, tokens = _setup(args)
    t0 = args.t0
    rows, summary = run_logit_shift_audit(
        model, sae, args.layer, args.head, tokens, atoms=args.atoms, n_atoms=args.n_atoms, t0=t0, eps=args.eps,
        eps_unit=args.eps_unit, horizon=args.horizon, token_ranks=args.token_ranks, forms=args.forms,
        max_prompts_per_atom=args.max_prompts_per_atom, batch_size=args.batch_size, seed=args.seed,
        progress=not args.quiet,
    )
    summary["config"]["model"] = args.model
    print(format_logit_shift_table(summary, paper=None if args.no_paper else _paper("PAPER_LOGIT_SHIFT")))
    _save(args, rows, summary, model, sae)
    return 0


def _paper(name: str) -> dict:
    from writesae_lens.analysis import report

    return getattr(report, name)


# ---------------------------------------------------------------- steer / erase / amplify (paper section 4)
def _model_label(args: argparse.Namespace) -> str:
    return str(args.model)


def _steer_args(p: argparse.ArgumentParser) -> None:
    from writesae_lens.interventions.installs import STRATA, InstallOptions
    from writesae_lens.interventions.sign_prediction import SignPredictionOptions

    _common(p, sae=False, context_size=64, n_windows=6)
    install, sign = InstallOptions(), SignPredictionOptions()
    p.add_argument("--sae", default=None, help="SAE (its layer/head; needed for sign prediction's atom keys)")
    p.add_argument("--sae-id", default=None)
    p.add_argument("--multipliers", type=float, nargs="+", default=list(install.multipliers))
    p.add_argument("--norm", choices=["kv", "write"], default=install.norm,
                   help="install size m ||k v^T|| (the paper's) or m ||beta k v^T|| (the native write)")
    p.add_argument("--install-key", choices=["native", "query"], default=install.key)
    p.add_argument("--n-starts", type=int, default=install.n_starts)
    p.add_argument("--starts", choices=["tail", "spread"], default=install.starts)
    p.add_argument("--strata", nargs="+", choices=list(STRATA), default=list(install.strata))
    p.add_argument("--targets-per-stratum", type=int, default=install.targets_per_stratum)
    p.add_argument("--rank-scale", choices=["vocab", "absolute"], default=install.rank_scale)
    p.add_argument("--semantic-seed", default=install.semantic_seed)
    p.add_argument("--max-new-tokens", type=int, default=install.max_new_tokens)
    p.add_argument("--sign-trials", type=int, default=sign.n_trials, help="sign-prediction trials (0: skip; needs --sae)")
    p.add_argument("--sign-key", choices=["atom", "native", "query", "random"], default=sign.key)
    p.add_argument("--sign-positions", choices=["firing", "any"], default=sign.positions)


def _steer(args: argparse.Namespace) -> int:
    from writesae_lens.analysis.probe_report import format_installs_table, format_sign_table
    from writesae_lens.interventions.installs import InstallOptions, run_installs
    from writesae_lens.interventions.sign_prediction import SignPredictionOptions, run_sign_prediction
    from writesae_lens.interventions.sites import resolve_site

    model = load_model(args.model, args.device, args.dtype)
    sae = load_sae(args.sae, args.sae_id, str(model.cfg.device)) if args.sae else None
    site = resolve_site(model, sae, args.layer, args.head)
    tokens = load_tokens(model, args)
    seed_token = int(args.semantic_seed) if args.semantic_seed.lstrip("-").isdigit() else args.semantic_seed
    options = InstallOptions(multipliers=tuple(args.multipliers), norm=args.norm, key=args.install_key, n_starts=args.n_starts,
                             starts=args.starts, strata=tuple(args.strata), targets_per_stratum=args.targets_per_stratum,
                             rank_scale=args.rank_scale, semantic_seed=seed_token, max_new_tokens=args.max_new_tokens)
    rows, summary = run_installs(model, tokens, layer=site.layer, head=site.head, options=options,
                                 batch_size=args.batch_size, seed=args.seed, progress=not args.quiet)
    print(format_installs_table(summary, _model_label(args), **({"paper": None} if args.no_paper else {})))
    summary = {"installs": summary}
    if args.sign_trials and sae is not None:
        sign_options = SignPredictionOptions(key=args.sign_key, positions=args.sign_positions, n_trials=args.sign_trials)
        _, sign = run_sign_prediction(model, sae, tokens, options=sign_options, layer=site.layer, head=site.head,
                                      batch_size=args.batch_size, seed=args.seed, progress=not args.quiet)
        print()
        print(format_sign_table(sign, _model_label(args), **({"paper": None} if args.no_paper else {})))
        summary["sign_prediction"] = sign
    elif args.sign_trials:
        print("\n(sign prediction skipped: it writes the atoms' key factors u_i, pass --sae)")
    _save(args, rows, summary, model, sae)
    return 0


def _erase_args(p: argparse.ArgumentParser) -> None:
    from writesae_lens.interventions.erasure import ErasureOptions

    _common(p, context_size=128, n_windows=16)
    o = ErasureOptions()
    p.add_argument("--feature", "--atom", dest="feature", type=int, required=True, help="the feature to erase")
    p.add_argument("--erase", choices=["write", "contribution"], default=o.erase)
    p.add_argument("--n", type=int, default=o.n, help="evaluation firings")
    p.add_argument("--target", type=erasure_target, default=o.target,
                   help="'detected' (feature detection before the run) or a token id")
    p.add_argument("--detect-on", choices=["held_out", "same"], default=o.detect_on)
    p.add_argument("--control-doses", type=float, nargs="+", default=list(o.control_doses), help="multiples of a*")
    p.add_argument("--control-n", type=int, default=o.control_n)
    p.add_argument("--dose-sweep", type=float, nargs="+", default=list(o.dose_sweep))
    p.add_argument("--dose-n", type=int, default=o.dose_n)
    p.add_argument("--alternative", choices=["two-sided", "less", "greater"], default=o.wilcoxon_alternative)


def _erase(args: argparse.Namespace) -> int:
    from writesae_lens.analysis.probe_report import format_erasure_table
    from writesae_lens.interventions.erasure import ErasureOptions, run_erasure

    model, sae, tokens = _setup(args)
    options = ErasureOptions(erase=args.erase, n=args.n, target=args.target, detect_on=args.detect_on,
                             control_doses=tuple(args.control_doses), control_n=args.control_n,
                             dose_sweep=tuple(args.dose_sweep), dose_n=args.dose_n, wilcoxon_alternative=args.alternative)
    rows, summary = run_erasure(model, sae, tokens, feature=args.feature, options=options, layer=args.layer, head=args.head,
                                batch_size=args.batch_size, seed=args.seed, progress=not args.quiet)
    print(format_erasure_table(summary, _model_label(args), **({"paper": None} if args.no_paper else {})))
    _save(args, rows, summary, model, sae)
    return 0


def _amplify_args(p: argparse.ArgumentParser) -> None:
    from writesae_lens.interventions.amplification import AmplificationOptions

    _common(p, context_size=128, n_windows=16)
    o = AmplificationOptions()
    p.add_argument("--n-prompts", type=int, default=8, help="windows used as prompts (the rest score the features)")
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--doses", type=float, nargs="+", default=list(o.doses))
    p.add_argument("--control-dose", type=float, default=o.control_dose)
    p.add_argument("--n-features", type=int, default=o.n_features)
    p.add_argument("--boundary-chars", default=o.boundary_chars)
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt (paper: 400)")
    p.add_argument("--temperature", type=float, default=o.temperature)


def _amplify(args: argparse.Namespace) -> int:
    from writesae_lens.analysis.probe_report import format_amplification_table
    from writesae_lens.interventions.amplification import AmplificationOptions, run_amplification

    model, sae, tokens = _setup(args)
    if len(tokens) <= args.n_prompts:
        raise SystemExit(f"--n-windows ({len(tokens)}) must exceed --n-prompts ({args.n_prompts}): the other windows score the features.")
    options = AmplificationOptions(doses=tuple(args.doses), control_dose=args.control_dose, n_features=args.n_features,
                                   boundary_chars=args.boundary_chars, max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature)
    rows, summary = run_amplification(model, sae, tokens[: args.n_prompts, : args.prompt_length],
                                      scoring_tokens=tokens[args.n_prompts :], options=options, seed=args.seed,
                                      progress=not args.quiet)
    print(format_amplification_table(summary, _model_label(args), **({"paper": None} if args.no_paper else {})))
    _save(args, rows, summary, model, sae)
    return 0


# ---------------------------------------------------------------- partition
def _partition_args(p: argparse.ArgumentParser) -> None:
    _common(p, context_size=256, n_windows=32)
    p.add_argument("--min-firings", type=int, default=5)
    p.add_argument("--absolute", action="store_true", help="use |cos|")
    p.add_argument("--log", action="store_true", help="fit the mixture on log |median cos|")


def _partition(args: argparse.Namespace) -> int:
    from writesae_lens.analysis.partition import register_bundle_partition
    from writesae_lens.analysis.report import format_partition_table

    model, sae, tokens = _setup(args)
    rows, summary = register_bundle_partition(model, sae, tokens, args.layer, args.head, min_firings=args.min_firings,
                                              absolute=args.absolute, transform="log" if args.log else "none",
                                              batch_size=args.batch_size, seed=args.seed, progress=not args.quiet)
    summary["model"] = args.model
    print(format_partition_table(summary, paper=None if args.no_paper else _paper("PAPER_PARTITION")))
    _save(args, rows, summary, model, sae)
    return 0


# ---------------------------------------------------------------- oracle
def _oracle_args(p: argparse.ArgumentParser) -> None:
    from writesae_lens.analysis.oracle_curve import DEFAULT_COSINES

    _common(p, sae=False, context_size=128, n_windows=24)
    p.add_argument("--sae", default=None, help="SAE (its layer/head, and its atoms' cosines to the writes at its firings)")
    p.add_argument("--sae-id", default=None)
    p.add_argument("--cosines", type=float, nargs="+", default=list(DEFAULT_COSINES))
    p.add_argument("--side", choices=["both", "key", "value"], default="both",
                   help="where the deviation from the write goes: split evenly, or all on the key / value factor")
    p.add_argument("--positions-per-window", type=int, default=20, help="positions drawn per window (without --sae)")


def _oracle(args: argparse.Namespace) -> int:
    import torch

    from writesae_lens.analysis.diagnostics import firing_cosines
    from writesae_lens.analysis.oracle_curve import atoms_beside_curve, format_oracle_curve, oracle_curve
    from writesae_lens.interventions.firings import find_firings
    from writesae_lens.interventions.sites import resolve_site

    model = load_model(args.model, args.device, args.dtype)
    sae = load_sae(args.sae, args.sae_id, str(model.cfg.device)) if args.sae else None
    site = resolve_site(model, sae, args.layer, args.head)
    tokens = load_tokens(model, args)
    if sae is not None:  # the positions the substitution test would evaluate, with the atoms it would install
        firings = find_firings(model, sae, tokens, site, max_firings=2000, batch_size=args.batch_size, seed=args.seed)
        positions = [(f.prompt, f.position) for f in firings]
    else:
        g = torch.Generator().manual_seed(args.seed)
        length = tokens.shape[1]
        positions = [(w, int(t)) for w in range(len(tokens))
                     for t in torch.randint(1, length - 1, (args.positions_per_window,), generator=g)]
    curve = oracle_curve(model, site.layer, site.head, tokens, positions, args.cosines, side=args.side,
                         seed=args.seed, batch_size=args.batch_size)
    if sae is not None:
        rows = [{"prompt": f.prompt, "position": f.position, "atom": f.atom} for f in firings]
        curve["atoms"] = atoms_beside_curve(curve, firing_cosines(model, sae, tokens, rows))
    print(f"{args.model}, layer {site.layer} head {site.head}, deviation: {args.side}")
    print("\n".join(format_oracle_curve(curve)))
    _save(args, None, curve, model, sae)
    return 0


# ---------------------------------------------------------------- demo
def _demo_args(p: argparse.ArgumentParser) -> None:
    from writesae_lens.demo import add_arguments

    add_arguments(p)
    add_json_argument(p)


def _demo(args: argparse.Namespace) -> int:
    from writesae_lens.demo import run

    return int(run(args) or 0)


register_subcommand("substitute", "substitution test: atom vs delete vs random rank-1 in place of one write", _substitute_args, _substitute)
register_subcommand("logit-shift", "measured vs closed-form logit shifts (gate / fitted / jvp)", _logit_shift_args, _logit_shift)
register_subcommand("steer", "sustained installs during greedy decoding, and single-position sign prediction", _steer_args, _steer)
register_subcommand("erase", "cache-slot erasure of one feature at its firings, the non-firing control and a dose sweep", _erase_args, _erase)
register_subcommand("amplify", "boundary-feature amplification during sampling: the dose-response table", _amplify_args, _amplify)
register_subcommand("partition", "register / bundle partition of the atoms (2- vs 1-component mixture, BIC)", _partition_args, _partition)
register_subcommand("oracle", "how close to the native write a same-norm rank-1 write must be to beat deletion (no SAE)",
                    _oracle_args, _oracle)
register_subcommand("demo", "toy GDN + its bundled SAE: the paper's headline checks side by side", _demo_args, _demo)


# ---------------------------------------------------------------- subcommands defined in other modules
def _lazy(module: str) -> tuple[Callable[[argparse.ArgumentParser], None], SubcommandRun]:
    """``module``'s ``add_arguments`` and ``run``, imported only when its subcommand is the one used
    (so ``writesae --help`` imports no torch)."""
    import importlib

    def add_arguments(p: argparse.ArgumentParser) -> None:
        importlib.import_module(module).add_arguments(p)

    def run(args: argparse.Namespace) -> int:
        return int(importlib.import_module(module).run(args) or 0)

    return add_arguments, run


register_subcommand("compare", "flat / matrix / bilinear / WriteSAE / tied / SVD / PCA on one site at one budget",
                    *_lazy("writesae_lens.compare"))
register_subcommand("downstream", "perplexity change when a head's state/write is replaced by the SAE reconstruction",
                    *_lazy("writesae_lens.downstream"))
register_subcommand("dashboard", "static atom dashboards: what each atom stores, when it is written and read",
                    *_lazy("writesae_lens.dashboard.cli"))


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``writesae`` parser; with ``only``, the arguments of that subcommand alone are added
    (what ``main`` does: a subcommand's arguments may import its module, e.g. ``demo``)."""
    parser = argparse.ArgumentParser(prog="writesae", description="WriteSAE experiments on recurrent cache writes.")
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help, add_arguments, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="on an error, show the traceback")
        if only is None or only == name:
            add_arguments(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``writesae``: one clear line and a non-zero exit status on an error (``--debug``: the traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((arg for arg in argv if arg in SUBCOMMANDS), "")  # "": no subcommand's arguments needed
    args = build_parser(only=command).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"writesae {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (every failure becomes one line, unless --debug)
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"writesae {args.command}: error: {message} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
