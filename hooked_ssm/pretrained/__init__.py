"""Loading pretrained checkpoints into HookedSSM: one converter module per family.

``load_pretrained`` accepts
- a local checkpoint directory: ``config.json`` + safetensors (sharded or not) or
  ``pytorch_model.bin`` (transformers layouts, the original mamba_ssm layout, fla-hub RWKV-7);
- a local BlinkDL RWKV-7 ``.pth`` file, or the same state dict as a ``.safetensors`` file;
- the name of a bundled toy model;
- a release name from :mod:`hooked_ssm.pretrained.model_names` (``state-spaces/mamba2-370m``,
  ``rwkv7-g1-0.4b`` ...) or any Hugging Face Hub id (downloaded with ``huggingface_hub``, which
  honours ``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.dtypes import parse_dtype
from hooked_ssm.families import CHECKPOINT_FAMILIES, family_of_architecture
from hooked_ssm.pretrained import rwkv7
from hooked_ssm.pretrained.checkpoint import CheckpointError, read_config
from hooked_ssm.pretrained.model_names import Release, find_release, release_names
from hooked_ssm.pretrained.torch_files import WEIGHT_FILE_SUFFIXES, read_weight_file

if TYPE_CHECKING:
    from hooked_ssm.model import HookedSSM

TOY_MODELS_DIR = Path(__file__).parent / "toy"
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]


def toy_model_names() -> list[str]:
    """The bundled toy models, by the names ``from_pretrained`` accepts."""
    return sorted(path.parent.name for path in TOY_MODELS_DIR.glob("*/config.json"))


def supported_architectures() -> list[str]:
    return sorted(arch for family in CHECKPOINT_FAMILIES for arch in family.architectures)


def resolve_checkpoint_dir(name_or_path: str | Path) -> Path:
    """The local checkpoint for ``name_or_path``: a directory, or a BlinkDL ``.pth``/``.safetensors`` file.

    Downloads release names and Hub ids (only those: a local path never touches the network).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix in WEIGHT_FILE_SUFFIXES:
            return path
        raise CheckpointError(
            f"{path} is a file; pass the checkpoint directory that holds config.json "
            f"(or a BlinkDL RWKV-7 .pth / .safetensors file)."
        )
    if path.suffix in WEIGHT_FILE_SUFFIXES:
        raise CheckpointError(f"{path} does not exist.")
    toy = TOY_MODELS_DIR / str(name_or_path)
    if (toy / "config.json").is_file():
        return toy
    found = find_release(str(name_or_path))
    if found is not None:
        return _download_release(*found)
    if str(name_or_path).count("/") != 1:
        close = difflib.get_close_matches(str(name_or_path), [*toy_model_names(), *release_names()], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise CheckpointError(
            f"{name_or_path!r} is neither a local checkpoint directory or weights file, a bundled toy model "
            f"({', '.join(toy_model_names())}), a known release ({', '.join(release_names())}), nor a Hub id "
            f"like 'org/name'.{hint}"
        )
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), allow_patterns=_HUB_FILES))


def _download_release(name: str, release: Release) -> Path:
    if release.filename is not None:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(release.repo_id, release.filename))
    from huggingface_hub import snapshot_download

    patterns = [*_HUB_FILES, "pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]
    return Path(snapshot_download(release.repo_id, allow_patterns=patterns))


def _architecture(raw_config: dict, directory: Path) -> str:
    names = raw_config.get("architectures") or []
    for name in names:
        if family_of_architecture(name) is not None:
            return name
    if not names:
        for family in CHECKPOINT_FAMILIES:
            if raw_config.get("model_type") in family.model_types:
                return family.architectures[0]
            found = getattr(family.module, "architecture_of", lambda raw: None)(raw_config)
            if found is not None:
                return found
    raise CheckpointError(
        f"Unsupported architecture {names or raw_config.get('model_type')!r} in {directory / 'config.json'}. "
        f"HookedSSM supports: {', '.join(supported_architectures())}."
    )


def _load_tokenizer(directory: Path) -> PreTrainedTokenizerBase | None:
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as err:  # a broken tokenizer should not stop weights from loading
        warnings.warn(f"Could not load the tokenizer in {directory} ({err}); continuing without one.")
        return None


def _load_release_tokenizer(release: Release | None) -> PreTrainedTokenizerBase | None:
    if release is None or release.tokenizer is None:
        return None
    try:
        return AutoTokenizer.from_pretrained(release.tokenizer)
    except Exception as err:  # offline, or the Hub is unreachable: weights still load
        warnings.warn(f"Could not load the tokenizer {release.tokenizer!r} ({err}); continuing without one.")
        return None


def _read_checkpoint(source: Path, release: Release | None) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    """``(architecture, config fields, raw state dict)`` of a checkpoint directory or .pth file."""
    defaults = release.defaults if release is not None else {}
    if source.is_file():  # a bare weights file: only BlinkDL's RWKV-7 layout has no config
        state = read_weight_file(source)
        return rwkv7.BLINK, rwkv7.config_from_blink(state, defaults), state
    raw_config = read_config(source)
    architecture = _architecture(raw_config, source)
    converter = family_of_architecture(architecture).module
    return architecture, *converter.read_checkpoint(source, raw_config, architecture, defaults)


def _check_expected(fields: dict[str, Any], release: Release | None, source: Path) -> None:
    if release is None:
        return
    wrong = {key: (fields.get(key), value) for key, value in release.expect.items() if fields.get(key) != value}
    if wrong:
        raise CheckpointError(f"{source} does not have the dims of its release (got vs expected: {wrong}).")


def load_pretrained(
    model_cls: type["HookedSSM"],
    name_or_path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    **config_overrides: Any,
) -> "HookedSSM":
    source = resolve_checkpoint_dir(name_or_path)
    is_local = Path(name_or_path).expanduser().exists()
    found = None if is_local else find_release(str(name_or_path))
    release = found[1] if found else None
    architecture, fields, raw_state = _read_checkpoint(source, release)
    _check_expected(fields, release, source)
    converter = family_of_architecture(architecture).module
    if dtype is not None:
        dtype = parse_dtype(dtype)
    cfg = HookedSSMConfig(
        **fields,
        model_name=str(name_or_path),
        dtype=dtype or torch.float32,
        device=None if device is None else str(device),
        **config_overrides,
    )
    state = converter.convert_state_dict(raw_state, cfg)
    if cfg.tie_word_embeddings:
        state["unembed.weight"] = state["embed.W_E"]
    with torch.device("meta"):  # no random init of weights that are about to be replaced
        model = model_cls(cfg, move_to_device=False)
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise CheckpointError(f"Converted checkpoint lacks parameters {sorted(missing)[:8]}.")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:  # shape mismatches: the weights do not fit the config
        raise CheckpointError(f"The weights in {source} do not fit its config: {err}") from err
    if cfg.tie_word_embeddings:
        model.unembed.weight = model.embed.W_E
    model.to(cfg.device, cfg.dtype)
    if tokenizer is None:
        tokenizer = _load_tokenizer(source) if source.is_dir() else None
        tokenizer = tokenizer or _load_release_tokenizer(release)
    if tokenizer is not None:
        model.set_tokenizer(tokenizer)
        model.cfg.tokenizer_name = str(name_or_path) if release is None else (release.tokenizer or str(name_or_path))
    return model.eval()
