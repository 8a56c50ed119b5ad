"""The ``writesae`` console script, kept outside the ``writesae_lens`` package so that ``--help``
answers at once.

Importing ``writesae_lens`` registers its SAE architectures with SAELens, which imports torch,
transformers and sae_lens (seconds). The command line itself (:mod:`writesae_lens.cli`) needs none
of that to parse arguments: this script loads that one module by path, without running the
package's ``__init__``; the subcommands import the package when they run.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType


def _cli_module() -> ModuleType:
    if "writesae_lens.cli" in sys.modules:
        return sys.modules["writesae_lens.cli"]
    package = importlib.util.find_spec("writesae_lens")  # finds the package without importing it
    if package is None or not package.submodule_search_locations:
        raise SystemExit("writesae: the writesae_lens package is not installed.")
    path = Path(list(package.submodule_search_locations)[0]) / "cli.py"
    spec = importlib.util.spec_from_file_location("writesae_lens_cli_standalone", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and typing resolve names through sys.modules
    spec.loader.exec_module(module)
    return module


def main(argv: Sequence[str] | None = None) -> int:
    return _cli_module().main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
