"""Loading an SAE from what a user types: a directory, ``release/sae_id``, or a release and an id.

Every path goes through the checked loaders of :mod:`writesae_lens.registry`, so a missing,
truncated or corrupt file is reported with the folder and the file at fault, and a release named
without an id (or with an unknown one) lists the ids it has.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any


def _releases() -> dict[str, Any]:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()


def _one_of(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def load_sae(spec: str | Path, sae_id: str | None = None, device: str = "cpu") -> Any:
    """An SAE from a local directory (``cfg.json`` + ``sae_weights.safetensors``), from
    ``"release/sae_id"``, or from ``spec=release`` and ``sae_id``."""
    import writesae_lens  # noqa: F401  (registers the architectures and the bundled releases)
    from sae_lens import SAE

    from writesae_lens.registry import checked_disk_loader

    spec = str(spec)
    path = Path(spec).expanduser()
    if sae_id is None and path.exists():
        if not path.is_dir():
            raise FileNotFoundError(
                f"SAE {spec!r} is a file; pass the SAE's directory (cfg.json + sae_weights.safetensors)."
            )
        return SAE.load_from_disk(path, device=device, converter=checked_disk_loader)
    releases = _releases()
    release = spec
    if sae_id is None and spec not in releases and "/" in spec:
        release, sae_id = spec.split("/", 1)
    if release not in releases:
        writesae = sorted(name for name in releases if name.startswith("writesae"))
        raise FileNotFoundError(
            f"SAE {spec!r} is neither an existing directory nor a known release. WriteSAE releases: "
            f"{', '.join(writesae) or '(none registered)'}; SAELens's own releases are listed by "
            f"sae_lens.loading.pretrained_saes_directory.get_pretrained_saes_directory().{_one_of(release, list(releases))}"
        )
    ids = sorted(releases[release].saes_map)
    if not sae_id:
        raise ValueError(f"Release {release!r} holds SAEs under ids; name one (release/id or --sae-id): {', '.join(ids)}.")
    if sae_id not in ids:
        raise ValueError(
            f"Release {release!r} has no SAE {sae_id!r}; its ids are: {', '.join(ids)}.{_one_of(sae_id, ids)}"
        )
    return SAE.from_pretrained(release, sae_id, device=device)
