"""Crash-safe file output: write under a temporary name, flush, then rename into place.

A rename within one filesystem is atomic, so readers (``SAE.load_from_disk``, a resumed run) see
either the previous complete files or the new complete ones, never a truncated file or a folder
that is missing half its contents.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def save_files_atomically(path: str | Path, save: Callable[[Path], tuple[Path, Path]]) -> tuple[Path, Path]:
    """Run ``save(tmp_dir) -> (weights, cfg)`` in a temporary folder inside ``path``, then move both
    files into ``path`` (flushed to disk, weights first, ``cfg.json`` last).

    A crash mid-save leaves either the previous files or none under the final names, never a
    truncated one; a folder without ``cfg.json`` is not an SAE to ``SAE.load_from_disk``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path, prefix=".saving-") as tmp:
        written = save(Path(tmp))
        final = tuple(path / Path(f).name for f in written)
        for src, dst in zip(written, final):
            _fsync(src)
            os.replace(src, dst)
    _fsync(path)
    return final  # type: ignore[return-value]


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk; best effort where the OS does not allow it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish_directory(staged: Path, final: Path) -> None:
    """Flush ``staged`` to disk and rename it to ``final`` (replacing an older ``final``).

    A folder rename within one filesystem is atomic, so ``final`` is either absent, the old folder, or
    the complete new one; never a half-written one.
    """
    for item in staged.rglob("*"):
        if item.is_file():
            _fsync(item)
    _fsync(staged)
    if final.exists():
        old = staged.with_name(staged.name + ".replaced")
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)
    _fsync(final.parent)


def publish_files(staged: Path, final: Path, last: str) -> None:
    """Move the files of ``staged`` into the folder ``final`` (flushed; ``last`` moved last)."""
    files = sorted((f for f in staged.iterdir() if f.is_file()), key=lambda f: f.name == last)
    for item in files:
        _fsync(item)
        os.replace(item, final / item.name)
    _fsync(final)


__all__ = ["publish_directory", "publish_files", "save_files_atomically"]
