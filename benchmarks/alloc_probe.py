"""The hook_write target comparison (transformers, no hooks vs HookedSSM with ``hook_write`` caching
one head on every Gated DeltaNet layer of the toy model, B=1, T=512) in a fresh process.

On CPU its result depends on glibc's allocator state: every call builds a fresh
``[batch, pos, head, d_k*d_v]`` write tensor per layer (33.5 MB here), above glibc's largest
dynamic mmap threshold (32 MiB), so each one is a new ``mmap`` whose pages fault in on first touch.
``bench_hooks`` runs this probe twice: with glibc's defaults, and with
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` = 1 GiB (freed memory is reused, no page
faults), to show how much of the overhead is page faults.

    python benchmarks/alloc_probe.py <budget_s>      (prints one JSON result row)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_hooks import capture_hooks, with_hooks  # noqa: E402
from common import Settings, build_reference, compare, load_hooked  # noqa: E402


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    settings = Settings(device="cpu", budget_s=float(sys.argv[1]) if len(sys.argv) > 1 else 6.0)
    ref, path, label = build_reference("qwen3_5", "toy", None, settings)
    model = load_hooked(path, settings)
    tokens = torch.randint(3, ref.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(7))
    store: list = []
    with torch.no_grad():
        row = compare(settings, bench="2 hooks", case="probe", reference=("transformers, no hooks", lambda: ref(tokens, use_cache=False).logits),
                      candidate=("HookedSSM + hook_write[:, :, 0] cached", with_hooks(model, tokens, capture_hooks(model, "hook_write", 0, store), store)),
                      tokens=512, min_rounds=7)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
