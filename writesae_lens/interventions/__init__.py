"""The paper's intervention toolkit on recurrent cache writes.

- :func:`run_substitution_test`: atom vs deletion vs random rank-1 in place of one native write
  (section 2 / App. J), with the shared-prefix fast path, JSONL streaming and resume;
- :func:`run_logit_shift_audit`: measured logit shifts vs the closed form (Eq. 1, App. A) in
  its ``gate`` / ``fitted`` / ``jvp`` forms;
- :func:`run_erasure`, :func:`run_sign_prediction`, :func:`sustained_install`,
  :func:`run_install_experiment`: the cache intervention probes of section 4.

Every protocol runs its patched continuations on :class:`InterventionEngine`
(:mod:`writesae_lens.interventions.engine`). Orientation: atoms are ``u w^T`` with ``u`` on the key
side and ``w`` on the value side (see :mod:`writesae_lens.interventions.atoms`).
"""

from writesae_lens.analysis.report import format_logit_shift_table, format_summary_table
from writesae_lens.interventions.amplification import amplified, amplified_generate
from writesae_lens.interventions.erasure import run_erasure, summarize_erasure
from writesae_lens.interventions.engine import (
    KL,
    Branch,
    BranchResult,
    Edit,
    InterventionEngine,
    LogitShift,
    Tangent,
    TokenLogProbs,
    add_to_state,
    add_write,
    install,
    replace_write,
)
from writesae_lens.interventions.firings import Firing, find_firings
from writesae_lens.interventions.sites import Site, resolve_site
from writesae_lens.interventions.tokens import token_windows, toy_validation_texts
from writesae_lens.interventions.logit_shift import (
    FORMS,
    closed_form_gate,
    gate_products,
    readout_matrix,
    run_logit_shift_audit,
    summarize_logit_shift,
)
from writesae_lens.interventions.steering import (
    DEFAULT_STRATA,
    run_install_experiment,
    run_sign_prediction,
    summarize_installs,
    sustained_install,
    target_directions,
)
from writesae_lens.interventions.substitution import (
    CONDITIONS,
    run_substitution_suite,
    run_substitution_test,
    substitute_firings,
    summarize_substitution,
)

__all__ = [
    "InterventionEngine",
    "Branch",
    "BranchResult",
    "Edit",
    "replace_write",
    "add_write",
    "add_to_state",
    "install",
    "KL",
    "LogitShift",
    "Tangent",
    "TokenLogProbs",
    "amplified",
    "amplified_generate",
    "format_summary_table",
    "format_logit_shift_table",
    "Firing",
    "Site",
    "find_firings",
    "resolve_site",
    "token_windows",
    "toy_validation_texts",
    "CONDITIONS",
    "run_substitution_test",
    "run_substitution_suite",
    "substitute_firings",
    "summarize_substitution",
    "FORMS",
    "closed_form_gate",
    "gate_products",
    "readout_matrix",
    "run_logit_shift_audit",
    "summarize_logit_shift",
    "run_erasure",
    "summarize_erasure",
    "DEFAULT_STRATA",
    "run_install_experiment",
    "run_sign_prediction",
    "summarize_installs",
    "sustained_install",
    "target_directions",
]
