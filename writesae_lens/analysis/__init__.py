"""Statistics, the register/bundle partition and paper-style reports for the intervention toolkit."""

from writesae_lens.analysis.partition import atom_write_cosines, register_bundle_partition
from writesae_lens.analysis.report import (
    PAPER_LOGIT_SHIFT,
    PAPER_PARTITION,
    PAPER_STEERING,
    PAPER_SUBSTITUTION,
    PAPER_SUBSTITUTION_MAMBA2,
    append_jsonl,
    format_logit_shift_table,
    format_partition_table,
    format_steering_table,
    format_summary_table,
    read_jsonl,
    to_dataframe,
)
from writesae_lens.analysis.stats import (
    bootstrap_ci,
    cliffs_delta,
    cluster_bootstrap_ci,
    compare_gmm_bic,
    fit_gmm_1d,
    median_mad,
    r_squared,
    wilcoxon_signed_rank,
    wilson_interval,
)

__all__ = [
    "register_bundle_partition",
    "atom_write_cosines",
    "PAPER_SUBSTITUTION",
    "PAPER_SUBSTITUTION_MAMBA2",
    "PAPER_LOGIT_SHIFT",
    "PAPER_PARTITION",
    "PAPER_STEERING",
    "append_jsonl",
    "read_jsonl",
    "to_dataframe",
    "format_summary_table",
    "format_logit_shift_table",
    "format_partition_table",
    "format_steering_table",
    "wilson_interval",
    "median_mad",
    "wilcoxon_signed_rank",
    "cliffs_delta",
    "bootstrap_ci",
    "cluster_bootstrap_ci",
    "r_squared",
    "fit_gmm_1d",
    "compare_gmm_bic",
]
