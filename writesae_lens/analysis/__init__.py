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
    cluster_bootstrap_ci,
    median_mad,
    paired_cliffs_delta,
    r_squared,
    signed_rank_test,
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
    "signed_rank_test",
    "paired_cliffs_delta",
    "bootstrap_ci",
    "cluster_bootstrap_ci",
    "r_squared",
]
