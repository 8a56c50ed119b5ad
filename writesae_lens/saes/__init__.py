"""Matrix-input SAE architectures, registered with SAELens when this package is imported.

| architecture | encoder | decoder | paper name |
|---|---|---|---|
| ``"writesae"`` | bilinear (``tied`` option) | rank-1 ``u_i w_i^T`` | BilinearSAE / WriteSAE (primary) |
| ``"writesae_matrix"`` | dense on ``vec(X)`` | rank-1 | MatrixSAE / "Rank-1" |
| ``"writesae_bilinear"`` | bilinear | flat | "Bilinear-flat" |
| ``"writesae_rank_r"`` | bilinear | rank-``r`` ``sum_j u_ij w_ij^T`` (``rank``, default 2) | rank-2 decoder control |

The flat baseline is SAELens's own ``"topk"`` / ``"batchtopk"`` SAE on the same site.

Layout (SAELens's: one file per architecture, each with its config, ``SAE`` and ``TrainingSAE``):
``write_sae.py``, ``matrix.py``, ``bilinear.py``; each declares its encoder / decoder in one small
``...Weights`` class built from the plain functions of ``weights.py``. ``base.py`` holds what all
share (config fields, SAELens plumbing, aux loss); ``factored.py`` the Gram identities that score a
rank-1 input from its factors; ``write_factors.py`` the ``input_kind="write_factors"`` input of
``"writesae"`` (its own classes, ``WriteFactorsSAE`` / ``WriteFactorsTrainingSAE``).
"""

from sae_lens import register_sae_class, register_sae_training_class
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

from writesae_lens.saes.bilinear import (
    BilinearFlatSAE,
    BilinearFlatSAEConfig,
    BilinearFlatTrainingSAE,
    BilinearFlatTrainingSAEConfig,
)
from writesae_lens.saes.matrix import (
    MatrixWriteSAE,
    MatrixWriteSAEConfig,
    MatrixWriteTrainingSAE,
    MatrixWriteTrainingSAEConfig,
)
from writesae_lens.saes.base import RankBreakingFoldError
from writesae_lens.saes.rank_r import RankRSAE, RankRSAEConfig, RankRTrainingSAE, RankRTrainingSAEConfig
from writesae_lens.saes.write_sae import (
    WriteFactorsSAE,
    WriteFactorsTrainingSAE,
    WriteSAE,
    WriteSAEConfig,
    WriteTrainingSAE,
    WriteTrainingSAEConfig,
)

ARCHITECTURES = {
    "writesae": (WriteSAE, WriteSAEConfig, WriteTrainingSAE, WriteTrainingSAEConfig),
    "writesae_matrix": (MatrixWriteSAE, MatrixWriteSAEConfig, MatrixWriteTrainingSAE, MatrixWriteTrainingSAEConfig),
    "writesae_bilinear": (BilinearFlatSAE, BilinearFlatSAEConfig, BilinearFlatTrainingSAE, BilinearFlatTrainingSAEConfig),
    "writesae_rank_r": (RankRSAE, RankRSAEConfig, RankRTrainingSAE, RankRTrainingSAEConfig),
}


def register_architectures() -> None:
    """Register every architecture with SAELens; safe to call more than once."""
    for name, (sae, cfg, training_sae, training_cfg) in ARCHITECTURES.items():
        if name not in SAE_CLASS_REGISTRY:
            register_sae_class(name, sae, cfg)
        if name not in SAE_TRAINING_CLASS_REGISTRY:
            register_sae_training_class(name, training_sae, training_cfg)


register_architectures()

__all__ = [
    "ARCHITECTURES",
    "RankBreakingFoldError",
    "register_architectures",
    "WriteSAE", "WriteSAEConfig", "WriteTrainingSAE", "WriteTrainingSAEConfig", "WriteFactorsSAE", "WriteFactorsTrainingSAE",
    "MatrixWriteSAE", "MatrixWriteSAEConfig", "MatrixWriteTrainingSAE", "MatrixWriteTrainingSAEConfig",
    "BilinearFlatSAE", "BilinearFlatSAEConfig", "BilinearFlatTrainingSAE", "BilinearFlatTrainingSAEConfig",
    "RankRSAE", "RankRSAEConfig", "RankRTrainingSAE", "RankRTrainingSAEConfig",
]
