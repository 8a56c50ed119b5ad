"""Loading pretrained checkpoints into HookedSSM: one converter module per family.

``load_pretrained`` accepts a local checkpoint directory (``config.json`` + safetensors, sharded or
not), the name of a bundled toy model, or a Hugging Face Hub id (downloaded with
``huggingface_hub``, which honours ``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.pretrained import qwen3_5
from hooked_ssm.pretrained.checkpoint import CheckpointError, read_config, read_safetensors

if TYPE_CHECKING:
    from hooked_ssm.model import HookedSSM

CONVERTERS: dict[str, ModuleType] = {arch: qwen3_5 for arch in qwen3_5.ARCHITECTURES}
TOY_MODELS_DIR = Path(__file__).parent / "toy"
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]


def supported_architectures() -> list[str]:
    return sorted(CONVERTERS)


def resolve_checkpoint_dir(name_or_path: str | Path) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    toy = TOY_MODELS_DIR / str(name_or_path)
    if (toy / "config.json").is_file():
        return toy
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds config.json.")
    if str(name_or_path).count("/") != 1:
        raise CheckpointError(
            f"{name_or_path!r} is neither a local checkpoint directory, a bundled toy model "
            f"({sorted(p.name for p in TOY_MODELS_DIR.glob('*/config.json'))}), nor a Hub id like 'org/name'."
        )
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), allow_patterns=_HUB_FILES))


def _architecture(raw_config: dict, directory: Path) -> str:
    names = raw_config.get("architectures") or []
    for name in names:
        if name in CONVERTERS:
            return name
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


def load_pretrained(
    model_cls: type["HookedSSM"],
    name_or_path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    **config_overrides: Any,
) -> "HookedSSM":
    directory = resolve_checkpoint_dir(name_or_path)
    raw_config = read_config(directory)
    architecture = _architecture(raw_config, directory)
    converter = CONVERTERS[architecture]
    fields = converter.config_from_hf(AutoConfig.from_pretrained(directory), architecture)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    cfg = HookedSSMConfig(
        **fields,
        model_name=str(name_or_path),
        dtype=dtype or torch.float32,
        device=None if device is None else str(device),
        **config_overrides,
    )
    state = converter.convert_state_dict(read_safetensors(directory), cfg)
    if cfg.tie_word_embeddings:
        state["unembed.weight"] = state["embed.W_E"]
    with torch.device("meta"):  # no random init of weights that are about to be replaced
        model = model_cls(cfg, move_to_device=False)
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise CheckpointError(f"Converted checkpoint lacks parameters {sorted(missing)[:8]}.")
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.unembed.weight = model.embed.W_E
    model.to(cfg.device, cfg.dtype)
    tokenizer = tokenizer or _load_tokenizer(directory)
    if tokenizer is not None:
        model.set_tokenizer(tokenizer)
        model.cfg.tokenizer_name = str(name_or_path)
    return model.eval()
