"""``"writesae_bilinear"``: a bilinear encoder with a flat (dense ``d_k*d_v``) decoder, the paper's
"Bilinear-flat" control (Table 7): same encoder as WriteSAE, atoms free to be full rank."""

from __future__ import annotations

from dataclasses import dataclass

from sae_lens.saes.sae import SAE, SAEConfig, TrainingSAE, TrainingSAEConfig

from writesae_lens.saes.matrix_sae import (
    BilinearEncoder,
    FlatDecoder,
    MatrixSAEFields,
    MatrixSAEMixin,
    MatrixTrainingFields,
    MatrixTrainingMixin,
)

ARCHITECTURE = "writesae_bilinear"


@dataclass(kw_only=True)
class BilinearFlatSAEConfig(MatrixSAEFields, SAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE


@dataclass(kw_only=True)
class BilinearFlatTrainingSAEConfig(MatrixTrainingFields, MatrixSAEFields, TrainingSAEConfig):
    rescale_acts_by_decoder_norm: bool = True

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE


class BilinearFlatSAE(MatrixSAEMixin, BilinearEncoder, FlatDecoder, SAE[BilinearFlatSAEConfig]):
    def initialize_weights(self) -> None:
        self._init_matrix_weights(init_norm=1.0)


class BilinearFlatTrainingSAE(MatrixTrainingMixin, BilinearEncoder, FlatDecoder, TrainingSAE[BilinearFlatTrainingSAEConfig]):
    def initialize_weights(self) -> None:
        self._init_training_weights()
