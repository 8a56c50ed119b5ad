"""``"writesae_matrix"``: a dense encoder on ``vec(X)`` and a rank-1 decoder (the paper's MatrixSAE,
"WriteSAE" in App. C's parameter count, "Rank-1" in Table 7). The encoder has ``d_in x d_sae``
parameters, so at ``d_k = d_v = 128`` it dominates; prefer ``"writesae"`` at real sizes."""

from __future__ import annotations

from dataclasses import dataclass

from sae_lens.saes.sae import SAE, SAEConfig, TrainingSAE, TrainingSAEConfig

from writesae_lens.saes.matrix_sae import (
    DenseEncoder,
    MatrixSAEFields,
    MatrixSAEMixin,
    MatrixTrainingFields,
    MatrixTrainingMixin,
    Rank1Decoder,
)

ARCHITECTURE = "writesae_matrix"


@dataclass(kw_only=True)
class MatrixWriteSAEConfig(MatrixSAEFields, SAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE


@dataclass(kw_only=True)
class MatrixWriteTrainingSAEConfig(MatrixTrainingFields, MatrixSAEFields, TrainingSAEConfig):
    rescale_acts_by_decoder_norm: bool = True

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE


class MatrixWriteSAE(MatrixSAEMixin, DenseEncoder, Rank1Decoder, SAE[MatrixWriteSAEConfig]):
    def initialize_weights(self) -> None:
        self._init_matrix_weights(init_norm=1.0)


class MatrixWriteTrainingSAE(MatrixTrainingMixin, DenseEncoder, Rank1Decoder, TrainingSAE[MatrixWriteTrainingSAEConfig]):
    def initialize_weights(self) -> None:
        self._init_training_weights()
