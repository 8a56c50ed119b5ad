"""WriteSAE releases for ``SAE.from_pretrained(release, sae_id)``: bundled, on the Hub, or your own.

SAELens resolves ``SAE.from_pretrained(release, sae_id)`` through a directory parsed once from its
packaged ``pretrained_saes.yaml`` (``get_pretrained_saes_directory()``, cached) and a table of
loaders (``NAMED_PRETRAINED_SAE_LOADERS``). It has no public way to add releases, so this module
*inserts* entries into that same cached dict (SAELens's own releases are never replaced or
shadowed) and adds two loaders:

* ``"writesae_local"``: releases stored in a local directory (the ones bundled with this package,
  and user releases registered with a path); offline, no Hub call.
* ``"writesae_hub"``: releases in a Hub repo, via ``hf_hub_download`` (which serves the HF cache
  when ``HF_HUB_OFFLINE=1``), with clear errors.

Both read SAELens's on-disk format: one folder per SAE with ``cfg.json`` + ``sae_weights.safetensors``
(+ optional ``sparsity.safetensors``), as written by ``SAE.save_model`` /
``TrainingSAE.save_inference_model`` / ``upload_saes_to_huggingface``. No pickles.

Three ways to make a release resolvable:

1. **Bundled** (``writesae_lens/releases/manifest.yaml``; registered on ``import writesae_lens``).
   One entry per release, e.g. the one-liner ``toy-gdn-writesae: {model: toy-gdn, path: toy-gdn}``
   where ``path`` is a folder under ``writesae_lens/releases/``; ``saes`` may be omitted (every
   sub-folder holding a ``cfg.json`` is an SAE whose id is its relative path). An empty manifest is fine.
2. **Hub repo without registration**: ``SAE.from_pretrained("org/repo", "<folder>")`` is SAELens's own
   "org/repo" path; it works offline from the HF cache with ``HF_HUB_OFFLINE=1``.
3. **At runtime**: :func:`register_release` (a local folder or an ``org/repo``), idempotent::

       import writesae_lens
       writesae_lens.register_release("my-writesaes", "/data/my_saes", model="Qwen/Qwen3.5-0.8B")
       sae = SAE.from_pretrained("my-writesaes", "blocks.9.mixer.hook_write.h4")

Loading errors name the file at fault: unknown sae id (SAELens lists the valid ids), a missing or
unreadable ``cfg.json`` / ``sae_weights.safetensors``, and an architecture that is not registered
(import ``writesae_lens`` or the package that defines it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub.errors import EntryNotFoundError
from safetensors import SafetensorError, safe_open
from sae_lens import logger
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME
from sae_lens.loading import pretrained_sae_loaders as _loaders
from sae_lens.loading.pretrained_saes_directory import PretrainedSAELookup, get_pretrained_saes_directory
from sae_lens.registry import SAE_CLASS_REGISTRY

__all__ = [
    "BUNDLED_MANIFEST",
    "LOCAL_LOADER_NAME",
    "HUB_LOADER_NAME",
    "register_release",
    "register_manifest",
    "unregister_release",
    "registered_releases",
    "local_release_loader",
    "checked_disk_loader",
    "hub_release_loader",
]

RELEASES_DIR = Path(__file__).resolve().parent / "releases"
BUNDLED_MANIFEST = RELEASES_DIR / "manifest.yaml"
LOCAL_LOADER_NAME = "writesae_local"
HUB_LOADER_NAME = "writesae_hub"
_HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SAE_FIELDS = {"id", "path", "l0", "variance_explained", "neuronpedia", "norm_scaling_factor"}
_RELEASE_FIELDS = {"model", "path", "repo_id", "saes", "config_overrides", "links"}

# Releases registered by this package: name -> lookup (the same object as in SAELens's directory).
_REGISTERED: dict[str, PretrainedSAELookup] = {}


# ---------------------------------------------------------------------------------------- loaders
def _read_cfg(
    cfg_path: Path, source: str, device: str | None, cfg_overrides: Mapping[str, Any] | None
) -> dict[str, Any]:
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{source}: the SAE config {cfg_path} is missing (expected {SAE_CFG_FILENAME}).")
    try:
        cfg_dict = _loaders.get_sae_lens_config_from_disk(cfg_path.parent, device, dict(cfg_overrides or {}))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{source}: the SAE config {cfg_path} is not valid JSON ({err}).") from err
    _check_architecture(cfg_dict, cfg_path)
    return cfg_dict


def _check_architecture(cfg_dict: Mapping[str, Any], cfg_path: Path | str) -> None:
    architecture = cfg_dict.get("architecture")
    if architecture is not None and architecture not in SAE_CLASS_REGISTRY:
        raise ValueError(
            f"{cfg_path} declares architecture {architecture!r}, which is not registered with SAELens. "
            f"Registered architectures: {sorted(SAE_CLASS_REGISTRY)}. WriteSAE architectures are registered by "
            f"`import writesae_lens`; other third-party architectures need their package imported first."
        )


def _read_weights(
    cfg_dict: dict[str, Any], weights_path: Path, source: str, device: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    if not weights_path.is_file():
        raise FileNotFoundError(f"{source}: the SAE weights file {weights_path} is missing.")
    try:
        return _loaders.read_sae_components_from_disk(cfg_dict=cfg_dict, weight_path=weights_path, device=device)
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{source}: the SAE weights file {weights_path} is not a readable safetensors file ({err}); "
            f"re-save or re-download it."
        ) from err


def _read_sparsity(path: Path | None, device: str) -> Any:
    if path is None or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device=device) as f:  # type: ignore[no-untyped-call]
            return f.get_tensor("sparsity")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"The sparsity file {path} is not a readable safetensors file ({err}).") from err


def local_release_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,  # noqa: ARG001 (nothing to download)
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """SAELens loader (``PretrainedSaeHuggingfaceLoader`` signature) for a release in a local folder:
    ``repo_id`` is the release's directory, ``folder_name`` the SAE's sub-folder."""
    sae_dir = Path(repo_id) / folder_name
    source = f"SAE folder {sae_dir}"
    if not sae_dir.is_dir():
        raise FileNotFoundError(f"{source} does not exist (release directory {repo_id}, sae path {folder_name!r}).")
    cfg_dict = _read_cfg(sae_dir / SAE_CFG_FILENAME, source, device, cfg_overrides)
    cfg_dict, state_dict = _read_weights(cfg_dict, sae_dir / SAE_WEIGHTS_FILENAME, source, device)
    return cfg_dict, state_dict, _read_sparsity(sae_dir / SPARSITY_FILENAME, device)


def checked_disk_loader(
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """SAELens's disk loader (``PretrainedSaeDiskLoader`` signature) with errors that name the file.

    ``SAE.load_from_disk(path)`` reports a truncated or corrupt weights file with safetensors' bare
    message (no path); ``SAE.load_from_disk(path, converter=checked_disk_loader)`` raises a
    ``FileNotFoundError`` / ``ValueError`` naming the folder and the file at fault.
    """
    folder = Path(path)
    source = f"SAE folder {folder}"
    if not folder.is_dir():
        raise FileNotFoundError(f"{source} does not exist.")
    cfg_dict = _read_cfg(folder / SAE_CFG_FILENAME, source, device, cfg_overrides)
    return _read_weights(cfg_dict, folder / SAE_WEIGHTS_FILENAME, source, device)


def hub_release_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """SAELens loader for a release in a Hub repo (SAELens format), with clear errors.

    Uses ``hf_hub_download``, so with ``HF_HUB_OFFLINE=1`` files come from the HF cache.
    """
    source = f"Hub repo {repo_id!r}, folder {folder_name!r}"

    def download(filename: str, required: bool = True) -> Path | None:
        try:
            # Looked up at call time: the same function SAELens's own loader uses.
            return Path(_loaders.hf_hub_download(repo_id=repo_id, filename=f"{folder_name}/{filename}",
                                                 force_download=force_download))
        except EntryNotFoundError as err:  # includes LocalEntryNotFoundError (offline, not cached)
            if not required:
                return None
            raise FileNotFoundError(
                f"{source}: {folder_name}/{filename} was not found ({type(err).__name__}). Offline "
                f"(HF_HUB_OFFLINE=1) it must already be in the HF cache; download it once online."
            ) from err

    cfg_path = download(SAE_CFG_FILENAME)
    assert cfg_path is not None
    cfg_dict = _read_cfg(cfg_path, source, device, cfg_overrides)
    weights_path = download(SAE_WEIGHTS_FILENAME)
    assert weights_path is not None
    cfg_dict, state_dict = _read_weights(cfg_dict, weights_path, source, device)
    return cfg_dict, state_dict, _read_sparsity(download(SPARSITY_FILENAME, required=False), device)


def _install_loaders() -> None:
    _loaders.NAMED_PRETRAINED_SAE_LOADERS[LOCAL_LOADER_NAME] = local_release_loader  # type: ignore[assignment]
    _loaders.NAMED_PRETRAINED_SAE_LOADERS[HUB_LOADER_NAME] = hub_release_loader  # type: ignore[assignment]


# ----------------------------------------------------------------------------------- registration
def _discover_saes(directory: Path) -> list[dict[str, Any]]:
    found = sorted(p.parent for p in directory.rglob(SAE_CFG_FILENAME) if p.parent != directory)
    return [{"id": p.relative_to(directory).as_posix(), "path": p.relative_to(directory).as_posix()} for p in found]


def _normalise_saes(saes: Any, name: str) -> list[dict[str, Any]]:
    if isinstance(saes, Mapping):
        entries = [{"id": sae_id, "path": path} for sae_id, path in saes.items()]
    elif isinstance(saes, Iterable) and not isinstance(saes, (str, bytes)):
        entries = []
        for item in saes:
            if isinstance(item, str):
                entries.append({"id": item, "path": item})
            elif isinstance(item, Mapping) and "id" in item:
                unknown = set(item) - _SAE_FIELDS
                if unknown:
                    raise ValueError(f"Release {name!r}: unknown field(s) {sorted(unknown)} in SAE entry {dict(item)}; "
                                     f"allowed: {sorted(_SAE_FIELDS)}.")
                entries.append({**item, "path": str(item.get("path", item["id"]))})
            else:
                raise ValueError(f"Release {name!r}: an SAE entry must be an id string or a dict with 'id' "
                                 f"(and 'path'), got {item!r}.")
    else:
        raise ValueError(f"Release {name!r}: saes must be a list of ids / dicts or a {{id: path}} dict, got {saes!r}.")
    ids = [entry["id"] for entry in entries]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"Release {name!r}: duplicate SAE ids {duplicates}.")
    return entries


def _model_from_cfg(directory: Path, entries: list[dict[str, Any]]) -> str:
    for entry in entries:
        try:
            cfg = json.loads((directory / entry["path"] / SAE_CFG_FILENAME).read_text())
        except (OSError, ValueError):
            continue
        model = (cfg.get("metadata") or {}).get("model_name") or cfg.get("model_name")
        if model:
            return str(model)
    return ""


def register_release(
    name: str,
    path_or_repo: str | Path,
    saes: Iterable[str | Mapping[str, Any]] | Mapping[str, str] | None = None,
    model: str | None = None,
    *,
    config_overrides: Mapping[str, Any] | None = None,
) -> PretrainedSAELookup:
    """Make ``SAE.from_pretrained(name, sae_id)`` resolve the SAEs of a release. Idempotent.

    Args:
        name: the release name (must not be one of SAELens's own releases).
        path_or_repo: a local directory (loaded offline) or a Hub repo id ``"org/repo"``.
        saes: the SAEs: ``["blocks.0.mixer.hook_write.h0", ...]`` (id = sub-folder),
            ``{id: sub-folder}``, or ``[{"id": ..., "path": ..., "l0": ..., "variance_explained": ...,
            "neuronpedia": ...}]``. For a local directory, None means every sub-folder holding a
            ``cfg.json`` (id = its relative path). Required for a Hub repo.
        model: the model the SAEs were trained on (default: ``metadata.model_name`` of the first
            local SAE config, else "").
        config_overrides: entries that override every ``cfg.json`` of the release when loading.

    Registering the same name again replaces the entry (registering identical arguments is a no-op).
    Returns the ``PretrainedSAELookup`` inserted into SAELens's directory.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"A release name must be a non-empty string, got {name!r}.")
    directory_dict = get_pretrained_saes_directory()
    if name in directory_dict and name not in _REGISTERED:
        raise ValueError(f"{name!r} is one of SAELens's own releases; register yours under another name.")
    local = Path(path_or_repo).expanduser()
    if local.is_dir():
        directory = local.resolve()
        entries = _normalise_saes(saes, name) if saes is not None else _discover_saes(directory)
        if not entries:
            raise ValueError(
                f"Release {name!r}: no SAE folder (with a {SAE_CFG_FILENAME}) under {directory}; pass saes=[...]."
            )
        repo_id, conversion_func = str(directory), LOCAL_LOADER_NAME
        model = model if model is not None else _model_from_cfg(directory, entries)
    elif isinstance(path_or_repo, str) and _HUB_REPO_ID.match(path_or_repo):
        if saes is None:
            raise ValueError(f"Release {name!r} on the Hub ({path_or_repo}): pass saes=[...] (the SAE folder ids).")
        entries = _normalise_saes(saes, name)
        repo_id, conversion_func = path_or_repo, HUB_LOADER_NAME
    else:
        raise ValueError(
            f"Release {name!r}: {str(path_or_repo)!r} is neither an existing directory nor a Hub repo id 'org/repo'."
        )
    lookup = PretrainedSAELookup(
        release=name,
        repo_id=repo_id,
        model=model or "",
        conversion_func=conversion_func,
        saes_map={e["id"]: e["path"] for e in entries},
        expected_var_explained={e["id"]: e.get("variance_explained", 1.0) for e in entries},
        expected_l0={e["id"]: e.get("l0", 0.0) for e in entries},
        neuronpedia_id={e["id"]: e["neuronpedia"] for e in entries if e.get("neuronpedia")},
        norm_scaling_factor={e["id"]: e["norm_scaling_factor"] for e in entries if "norm_scaling_factor" in e},
        config_overrides=dict(config_overrides) if config_overrides else None,
    )
    _install_loaders()
    existing = directory_dict.get(name)
    if existing is not None and existing == lookup:
        return existing
    if existing is not None:
        logger.info(f"Replacing the registration of release {name!r}.")
    directory_dict[name] = lookup  # insert into SAELens's cached directory; never replace the dict
    _REGISTERED[name] = lookup
    return lookup


def unregister_release(name: str) -> None:
    """Remove a release registered by :func:`register_release` (SAELens's own releases are left alone)."""
    if name not in _REGISTERED:
        raise KeyError(f"{name!r} was not registered by writesae_lens; registered: {sorted(_REGISTERED)}.")
    del _REGISTERED[name]
    get_pretrained_saes_directory().pop(name, None)


def registered_releases() -> dict[str, PretrainedSAELookup]:
    """The releases registered by this package (bundled and runtime), by name."""
    return dict(_REGISTERED)


def register_manifest(manifest: str | Path, base_dir: str | Path | None = None) -> list[str]:
    """Register every release of a YAML manifest (format: ``writesae_lens/releases/manifest.yaml``).

    ``path`` entries are relative to ``base_dir`` (default: the manifest's folder). Returns the
    release names. An empty manifest registers nothing (and does not load SAELens's directory).
    """
    manifest = Path(manifest)
    try:
        data = yaml.safe_load(manifest.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"The release manifest {manifest} is not valid YAML: {err}") from err
    if not isinstance(data, Mapping):
        raise ValueError(
            f"The release manifest {manifest} must map release names to entries, got {type(data).__name__}."
        )
    base = Path(base_dir) if base_dir is not None else manifest.parent
    names = []
    for name, entry in data.items():
        if not isinstance(entry, Mapping) or ("path" in entry) == ("repo_id" in entry):
            raise ValueError(f"{manifest}: release {name!r} needs exactly one of 'path' (bundled folder) or "
                             f"'repo_id' (Hub), got {entry!r}.")
        unknown = set(entry) - _RELEASE_FIELDS
        if unknown:
            raise ValueError(f"{manifest}: release {name!r} has unknown field(s) {sorted(unknown)}; "
                             f"allowed: {sorted(_RELEASE_FIELDS)}.")
        if "path" in entry:
            location: str | Path = base / entry["path"]
            if not Path(location).is_dir():
                raise ValueError(f"{manifest}: release {name!r}: folder {location} does not exist.")
        else:
            location = str(entry["repo_id"])
        register_release(str(name), location, saes=entry.get("saes"), model=entry.get("model"),
                         config_overrides=entry.get("config_overrides"))
        names.append(str(name))
    return names


def _register_bundled() -> None:
    _install_loaders()
    if BUNDLED_MANIFEST.is_file():
        register_manifest(BUNDLED_MANIFEST)


_register_bundled()
