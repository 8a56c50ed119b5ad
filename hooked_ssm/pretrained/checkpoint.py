"""Reading checkpoint directories (config.json plus possibly sharded safetensors, with clear errors), and
the pieces every converter shares."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor
from transformers import PretrainedConfig


class CheckpointError(RuntimeError):
    """A checkpoint is missing, malformed, or does not fit the architecture it claims."""


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json; is it a Hugging Face checkpoint directory?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); re-download or re-save the checkpoint.") from err


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index} is malformed ({err!r}); re-download the checkpoint.") from err
        files = [directory / shard for shard in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{directory} is missing shards {missing} listed in {index.name}.")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory} holds no *.safetensors weights.")
    return files


def read_safetensors_file(file: Path) -> dict[str, Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"Could not read {file}: {err}. The file is truncated or corrupt; re-download or re-save it."
        ) from err


def read_safetensors(directory: Path) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for file in safetensors_files(directory):
        state.update(read_safetensors_file(file))
    return state


def take(state: dict[str, Tensor], key: str) -> Tensor:
    """Pop ``key``; a missing key means the checkpoint does not match its config."""
    try:
        return state.pop(key)
    except KeyError:
        raise CheckpointError(f"Checkpoint is missing the tensor {key!r} that its config implies.") from None


def take_embeddings(
    state: dict[str, Tensor], tie_word_embeddings: bool, embed: str, final_norm: str | None
) -> dict[str, Tensor]:
    """``embed.W_E``, ``ln_final.w`` (unless ``final_norm`` is None: a final layer of other
    parameters) and, untied, ``unembed.weight`` (``lm_head.weight``); a tied checkpoint's
    ``lm_head.weight`` copy is dropped."""
    out = {"embed.W_E": take(state, embed)}
    if final_norm is not None:
        out["ln_final.w"] = take(state, final_norm)
    lm_head = state.pop("lm_head.weight", None)
    if not tie_word_embeddings:
        if lm_head is None:
            raise CheckpointError("Checkpoint has no lm_head.weight but its config says the embeddings are untied.")
        out["unembed.weight"] = lm_head
    return out


def ensure_consumed(state: dict[str, Tensor]) -> None:
    """Raise if a converter left tensors: a checkpoint that does not match its config never loads silently."""
    if state:
        raise CheckpointError(f"Checkpoint has tensors the config does not account for: {sorted(state)[:8]}")


def transformers_fields(hf: PretrainedConfig, architecture: str) -> dict[str, Any]:
    """The HookedSSMConfig fields every transformers causal LM config states the same way."""
    return dict(
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        d_vocab=hf.vocab_size,
        tie_word_embeddings=bool(hf.tie_word_embeddings),
        n_ctx=hf.max_position_embeddings,
        original_architecture=architecture,
        bos_token_id=hf.bos_token_id,
        eos_token_id=hf.eos_token_id,
        pad_token_id=hf.pad_token_id,
    )
