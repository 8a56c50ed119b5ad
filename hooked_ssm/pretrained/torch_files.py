"""Reading PyTorch weight files (``pytorch_model.bin``, BlinkDL ``.pth``) safely, with clear errors.

Always ``torch.load(..., weights_only=True)``: a checkpoint is a dict of tensors, never arbitrary
pickled code.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from hooked_ssm.pretrained.checkpoint import CheckpointError, read_safetensors, read_safetensors_file

TORCH_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin")
#: Suffixes of a single weights file that ``from_pretrained`` accepts in place of a directory.
WEIGHT_FILE_SUFFIXES = (*TORCH_WEIGHT_SUFFIXES, ".safetensors")


def read_torch_file(path: Path) -> dict[str, Tensor]:
    """Load a state dict saved with ``torch.save``; raise CheckpointError if it is anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f"Could not read {path} as a PyTorch state dict ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "The file is truncated, corrupt, or not a weights-only checkpoint; re-download it."
        ) from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # a training checkpoint wrapping the weights
    if not isinstance(state, dict) or not state or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path} does not hold a state dict (a dict of name -> tensor).")
    return state


def read_weight_file(path: Path) -> dict[str, Tensor]:
    """A single weights file: safetensors (``.safetensors``, no pickle at all) or ``torch.save``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return read_torch_file(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist.")
    return read_safetensors_file(path)


def _is_zip(path: Path) -> bool:
    return zipfile.is_zipfile(path)  # mmap only works for the zip format torch.save writes since 1.6


def read_weights(directory: Path) -> dict[str, Tensor]:
    """Weights of a checkpoint directory: safetensors if present, else ``pytorch_model.bin``
    (possibly sharded, with ``pytorch_model.bin.index.json``)."""
    if any(directory.glob("*.safetensors")) or (directory / "model.safetensors.index.json").is_file():
        return read_safetensors(directory)
    index = directory / "pytorch_model.bin.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index} is malformed ({err!r}); re-download the checkpoint.") from err
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(read_torch_file(directory / shard))
        return state
    if (directory / "pytorch_model.bin").is_file():
        return read_torch_file(directory / "pytorch_model.bin")
    raise CheckpointError(f"{directory} holds no weights (*.safetensors or pytorch_model.bin).")
