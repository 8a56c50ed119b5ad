"""CPU peak-memory probe: one measurement per fresh process (used by the other benchmarks on CPU).

PyTorch has no peak-memory counter for CPU tensors, and ``tracemalloc`` does not see them. So the
measurement runs in a fresh process started with ``MALLOC_MMAP_THRESHOLD_=65536``: every tensor of
64 KiB or more is then its own ``mmap`` and is returned to the OS when freed, and the resident-set
size, sampled every 0.5 ms in a thread, follows the live tensor bytes. The reported peak is the
growth over the resident size before the measured call (after one warm-up call, so lazily created
state such as Adam's moments is not counted).

    python benchmarks/mem_probe.py '<json spec>'     (prints one JSON object)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PeakRSS, Settings, load_hooked, tensor_bytes  # noqa: E402


def state_cache(spec: dict[str, Any]):
    settings = Settings(device="cpu")
    model = load_hooked(Path(spec["path"]), settings)
    gen = torch.Generator().manual_seed(spec["seed"])
    tokens = torch.randint(3, model.cfg.d_vocab, (spec["batch"], spec["length"]), generator=gen)
    kwargs = dict(names_filter=spec["hook"], return_type=None)
    if spec.get("pos_slice") is not None:
        kwargs["pos_slice"] = spec["pos_slice"]
    return lambda: model.run_with_cache(tokens, **kwargs)[1]


def sae_step(spec: dict[str, Any]):
    from bench_sae import make_training_sae, rank1_inputs, training_step_fn

    k, v = rank1_inputs(spec["batch"], spec["d_k"], spec["d_v"], "cpu")
    x = (k[:, :, None] * v[:, None, :]).flatten(1)
    sae = make_training_sae(spec["architecture"], spec["d_k"], spec["d_v"], "cpu")
    return training_step_fn(sae, x)


def sae_path(spec: dict[str, Any]):
    from bench_sae import factored_case

    materialised, factored, _ = factored_case("cpu", dead_half=spec.get("dead_half", False), batch=spec["batch"])
    return materialised if spec["path"] == "materialised" else factored


KINDS = {"state_cache": state_cache, "sae_step": sae_step, "sae_path": sae_path}


def main() -> None:
    spec = json.loads(sys.argv[1])
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    fn = KINDS[spec["kind"]](spec)
    fn()  # warm-up: lazily created state is not part of the peak
    with torch.no_grad() if spec["kind"] == "state_cache" else torch.enable_grad():
        with PeakRSS() as probe:
            out = fn()
    print(json.dumps({"peak_bytes": probe.delta, "result_bytes": tensor_bytes(out),
                      "how": "peak RSS growth in a fresh process with MALLOC_MMAP_THRESHOLD_=65536 (sampled every 0.5 ms)"}))


if __name__ == "__main__":
    main()
