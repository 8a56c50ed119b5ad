"""writesae_lens: WriteSAE rank-1 cache-write dictionaries on SAELens.

Importing the package registers the matrix SAE architectures ("writesae", "writesae_matrix",
"writesae_bilinear") and the bundled WriteSAE releases with SAELens, so ``SAE.load_from_disk``
and ``SAE.from_pretrained(release, sae_id)`` resolve them.
"""

from writesae_lens.saes import (
    ARCHITECTURES,
    BilinearFlatSAE,
    MatrixWriteSAE,
    WriteSAE,
    WriteTrainingSAE,
    WriteTrainingSAEConfig,
)

from writesae_lens.evals import (
    HeadAwareEvalModel,
    HeadAwareLLMSaeEvaluator,
    HeadAwareMultiSAEEvaluator,
    head_aware_model,
    install_head_aware_evaluator,
    run_evals,
)
from writesae_lens.registry import (
    checked_disk_loader,
    register_manifest,
    register_release,
    registered_releases,
    unregister_release,
)
from writesae_lens.splicing import HookedSAESSM, SAESplicingMixin, sae_site_name
from writesae_lens.training import WriteSAETrainingRunner, build_runner, train_write_sae, write_sae_runner_config

__all__ = [
    # architectures
    "ARCHITECTURES",
    "WriteSAE",
    "WriteTrainingSAE",
    "WriteTrainingSAEConfig",
    "MatrixWriteSAE",
    "BilinearFlatSAE",
    # training
    "write_sae_runner_config",
    "build_runner",
    "train_write_sae",
    "WriteSAETrainingRunner",
    # splicing
    "HookedSAESSM",
    "SAESplicingMixin",
    "sae_site_name",
    # evals
    "run_evals",
    "HeadAwareEvalModel",
    "head_aware_model",
    "HeadAwareLLMSaeEvaluator",
    "HeadAwareMultiSAEEvaluator",
    "install_head_aware_evaluator",
    # registry
    "register_release",
    "register_manifest",
    "unregister_release",
    "registered_releases",
    "checked_disk_loader",
]
