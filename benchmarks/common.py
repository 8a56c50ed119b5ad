"""Shared machinery of the benchmark scripts: interleaved A/B timing, memory probes, model builders,
and the results table.

Every comparison runs the reference and the candidate in the same process, on the same inputs,
interleaved (A B, then B A, ...), and reports the **median of the per-round ratios**
``t_reference / t_candidate`` (> 1: the candidate is faster). Absolute times are recorded too but,
on a shared CPU, only the ratios mean much.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/run_all.py` from anywhere
    sys.path.insert(0, str(ROOT))

# --------------------------------------------------------------------------- run settings


class DeadlineReached(RuntimeError):
    """Raised by ``compare`` once the run's ``--deadline`` has passed (the rest is skipped)."""


class Settings:
    """What every benchmark reads: device, quick mode, time budget per comparison, result sink."""

    def __init__(self, device: str = "cpu", quick: bool = False, threads: int | None = None,
                 budget_s: float = 20.0, out: Path | None = None, only: list[str] | None = None,
                 deadline_s: float | None = None):
        self.deadline_s = deadline_s
        self.fingerprints: dict[str, str] = {}
        self.device = device
        self.quick = quick
        self.threads = threads
        self.budget_s = budget_s  # rough wall-clock budget of one A/B comparison (timed rounds only)
        self.out = out
        self.only = only
        self.results: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.started = time.time()
        self.workdir = Path(tempfile.mkdtemp(prefix="writesae_bench_"))

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def add(self, **row: Any) -> dict[str, Any]:
        row = {k: _jsonable(v) for k, v in row.items()}
        self.results.append(row)
        print("  " + format_row_short(row), flush=True)
        self.save()
        return row

    def note(self, text: str) -> None:
        print(f"  NOTE: {text}", flush=True)
        self.notes.append(text)
        self.save()

    def save(self) -> None:
        if self.out is None:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"environment": environment(self), "notes": self.notes, "results": self.results}
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(self.out)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6) if value == value else None
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def code_fingerprint() -> str:
    """Short hash of the library sources (hooked_ssm, writesae_lens): other people edit them while
    benchmarks run, so each benchmark records the version it imported."""
    import hashlib

    digest = hashlib.sha1()
    for package in ("hooked_ssm", "writesae_lens"):
        for path in sorted((ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def environment(settings: Settings) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": settings.device,
        "quick": settings.quick,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "elapsed_s": round(time.time() - settings.started, 1),
        "code_fingerprint_per_benchmark": settings.fingerprints,
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    for name in ("transformer_lens", "sae_lens"):
        try:
            module = __import__(name)
            env[name] = getattr(module, "__version__", "installed")
        except Exception:  # noqa: BLE001 - absent on the GPU machine
            env[name] = None
    if settings.cuda:
        env["gpu"] = torch.cuda.get_device_name()
    try:
        env["loadavg"] = os.getloadavg()
    except OSError:
        pass
    return env


# --------------------------------------------------------------------------- timing


def interleaved(
    fns: dict[str, Callable[[], Any]],
    settings: Settings,
    *,
    warmup: int = 1,
    min_rounds: int = 3,
    max_rounds: int = 15,
    budget_s: float | None = None,
) -> dict[str, list[float]]:
    """Time each function once per round, alternating the order every round (A B, B A, ...).

    The number of rounds is chosen so that the timed part takes about ``budget_s`` (at least
    ``min_rounds``, at most ``max_rounds``), from the time of the last warm-up call.
    """
    budget = settings.budget_s if budget_s is None else budget_s
    names = list(fns)
    last: dict[str, float] = {}
    for _ in range(max(warmup, 1)):
        for name in names:
            last[name] = _time_once(fns[name], settings)
    per_round = sum(last.values())
    rounds = int(max(min_rounds, min(max_rounds, budget // max(per_round, 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            times[name].append(_time_once(fns[name], settings))
    return times


def _time_once(fn: Callable[[], Any], settings: Settings) -> float:
    settings.sync()
    start = time.perf_counter()
    out = fn()
    settings.sync()
    elapsed = time.perf_counter() - start
    del out
    return elapsed


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def median_ratio(reference: list[float], candidate: list[float]) -> float:
    """Median over rounds of ``reference / candidate`` (> 1: the candidate is faster)."""
    return statistics.median(r / c for r, c in zip(reference, candidate))


def spread(xs: list[float]) -> float:
    """Relative half-range of the middle half of ``xs`` (a rough noise figure)."""
    if len(xs) < 4:
        return (max(xs) - min(xs)) / (2 * statistics.median(xs))
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / (2 * statistics.median(xs))


# --------------------------------------------------------------------------- memory


class PeakRSS:
    """Peak resident-set growth during a block, sampled every ``interval`` seconds in a thread.

    ``tracemalloc`` does not see PyTorch's CPU allocations (they bypass Python's allocator), so
    the process RSS is what measures tensors on CPU. Large tensors are ``mmap``-ed and returned to
    the OS when freed, so the peak growth is a fair (slightly low) estimate of the peak footprint.
    """

    def __init__(self, interval: float = 0.0005):
        self.interval = interval
        self.peak = 0
        self.start = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        self.start = self.peak = self.rss()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def delta(self) -> int:
        return self.peak - self.start


@contextmanager
def cuda_peak_memory(settings: Settings):
    """Yields a dict that receives ``peak_bytes``: growth of ``torch.cuda.max_memory_allocated``."""
    result: dict[str, Any] = {}
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    yield result
    torch.cuda.synchronize()
    result["peak_bytes"] = torch.cuda.max_memory_allocated() - base
    result["how"] = "torch.cuda.max_memory_allocated - allocated before"


def measure_peak(settings: Settings, spec: dict[str, Any], fn: Callable[[], Any]) -> dict[str, Any]:
    """Peak memory of one call of ``fn`` (after a warm-up call).

    GPU: in this process, ``torch.cuda.max_memory_allocated``. CPU: ``spec`` is re-created and
    measured in a fresh process by ``mem_probe.py`` (peak RSS growth with every large tensor
    mmap-ed, see there); ``fn`` is not used.
    """
    if settings.cuda:
        fn()
        with cuda_peak_memory(settings) as mem:
            out = fn()
        mem["result_bytes"] = tensor_bytes(out)
        del out
        return mem
    import subprocess

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("mem_probe.py")), json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"mem_probe failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict) or hasattr(obj, "items"):
        return sum(tensor_bytes(v) for _, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def mib(n: float) -> float:
    return n / 2**20


# --------------------------------------------------------------------------- models

# Qwen3.5-0.8B text tower (the shapes of Qwen/Qwen3.5-0.8B's text_config).
QWEN35_08B = dict(
    vocab_size=248320, hidden_size=1024, intermediate_size=3584, num_attention_heads=8, num_key_value_heads=2,
    head_dim=256, linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128,
    linear_value_head_dim=128, linear_conv_kernel_dim=4, hidden_act="silu", rms_norm_eps=1e-6,
    tie_word_embeddings=True, max_position_embeddings=8192, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                     "mrope_section": [11, 11, 10], "mrope_interleaved": True},
)
QWEN35_08B_LAYERS = 24
# state-spaces/mamba2-370m (d_model 1024, 48 layers, headdim 64, d_state 128, 1 group, GPT-NeoX vocab).
MAMBA2_370M = dict(
    vocab_size=50288, hidden_size=1024, expand=2, head_dim=64, num_heads=32, state_size=128, n_groups=1,
    conv_kernel=4, use_bias=False, use_conv_bias=True, chunk_size=256, layer_norm_epsilon=1e-5,
    residual_in_fp32=True, tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=0,
)
MAMBA2_370M_LAYERS = 48


def toy_dir(name: str) -> Path:
    from hooked_ssm.pretrained import TOY_MODELS_DIR

    return TOY_MODELS_DIR / name


def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter (as tests/conftest.py does): HF inits norms and gates to constants."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.3 if ("norm" in name or "A_log" in name or "dt_bias" in name) else 0.02
            param.add_((scale * torch.randn(param.shape, generator=gen)).to(param.device, param.dtype))
    return model.eval()


def build_reference(family: str, shape: str, n_layers: int | None, settings: Settings) -> tuple[Any, Path, str]:
    """A transformers reference model and the local directory its weights were saved to.

    ``shape``: "toy" (the bundled toy checkpoint, loaded as-is) or "real" (random weights at the
    real release's shape, ``n_layers`` layers: fewer than the release is labelled in the case name).
    Returns ``(reference model in eval mode, checkpoint dir, label)``.
    """
    from transformers import Mamba2Config, Mamba2ForCausalLM, Qwen3_5ForCausalLM, Qwen3_5TextConfig

    cls = Qwen3_5ForCausalLM if family == "qwen3_5" else Mamba2ForCausalLM
    if shape == "toy":
        path = toy_dir("toy-gdn" if family == "qwen3_5" else "toy-mamba2")
        model = cls.from_pretrained(path, dtype=torch.float32).to(settings.device).eval()
        return model, path, f"toy ({path.name})"
    if family == "qwen3_5":
        full = QWEN35_08B_LAYERS
        n_layers = n_layers or full
        if n_layers % 4:
            raise ValueError("Qwen3.5 layers come in groups of 4 ([lin, lin, lin, full]).")
        cfg = Qwen3_5TextConfig(**QWEN35_08B, num_hidden_layers=n_layers,
                                layer_types=(["linear_attention"] * 3 + ["full_attention"]) * (n_layers // 4))
        label = f"Qwen3.5-0.8B shape, {n_layers}/{full} layers"
    else:
        full = MAMBA2_370M_LAYERS
        n_layers = n_layers or full
        cfg = Mamba2Config(**MAMBA2_370M, num_hidden_layers=n_layers)
        label = f"Mamba-2-370m shape, {n_layers}/{full} layers"
    torch.manual_seed(0)
    with torch.device(settings.device):
        model = cls(cfg)
    model = perturb_(model.float(), seed=0)
    path = settings.workdir / f"{family}_{shape}_{n_layers}"
    model.save_pretrained(path)
    return model, path, label


def load_hooked(path: Path, settings: Settings, execution: str = "chunked") -> Any:
    from hooked_ssm import HookedSSM

    return HookedSSM.from_pretrained(path, device=settings.device, dtype=torch.float32, execution=execution).eval()


def set_execution(model: Any, execution: str) -> None:
    """Switch every recurrent mixer between the chunked and the recurrent scan (same weights)."""
    model.cfg.execution = execution
    for block in model.blocks:
        mixer = getattr(block, "mixer", None)
        if mixer is not None and hasattr(mixer, "execution"):
            mixer.execution = execution


def free(*objs: Any) -> None:
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- table


def fmt_num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "**no**"
    if isinstance(x, (int, float)):
        if x == 0:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def format_row_short(row: dict[str, Any]) -> str:
    parts = [row.get("bench", ""), row.get("case", "")]
    if "speedup" in row:
        parts.append(f"speedup {fmt_num(row['speedup'])}x")
    if "value" in row:
        parts.append(f"{row.get('metric', 'value')} {fmt_num(row['value'])}")
    if row.get("target"):
        parts.append(f"target {row['target']}: {'met' if row.get('met') else 'MISSED'}")
    return " | ".join(str(p) for p in parts)


TABLE_COLUMNS = [
    ("bench", "benchmark"),
    ("case", "case"),
    ("reference", "reference (A)"),
    ("candidate", "candidate (B)"),
    ("ref_value", "A"),
    ("cand_value", "B"),
    ("speedup", "A/B ratio (median)"),
    ("target", "target"),
    ("met", "met"),
]


def markdown_table(results: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for _, title in TABLE_COLUMNS) + " |",
             "|" + "---|" * len(TABLE_COLUMNS)]
    for row in results:
        cells = []
        for key, _ in TABLE_COLUMNS:
            value = row.get(key)
            if key in ("ref_value", "cand_value") and value is not None:
                cells.append(f"{fmt_num(value)} {row.get('unit', '')}".strip())
            elif key == "speedup" and value is not None:
                cells.append(f"{fmt_num(value)}x")
            elif key == "met" and not row.get("target"):
                cells.append("")
            else:
                cells.append(fmt_num(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(
    settings: Settings,
    *,
    bench: str,
    case: str,
    reference: tuple[str, Callable[[], Any]],
    candidate: tuple[str, Callable[[], Any]],
    tokens: int | None = None,
    target: str | None = None,
    target_check: Callable[[float], bool] | None = None,
    extra: dict[str, Any] | None = None,
    budget_s: float | None = None,
    min_rounds: int = 3,
    max_rounds: int = 15,
) -> dict[str, Any]:
    """Interleaved A/B timing of two callables; records one result row.

    ``tokens`` (per call) turns times into tokens/s; otherwise the row reports seconds per call.
    """
    if settings.deadline_s is not None and time.time() - settings.started > settings.deadline_s:
        raise DeadlineReached(f"--deadline {settings.deadline_s:.0f} s reached before: {bench} {case}")
    (ref_name, ref_fn), (cand_name, cand_fn) = reference, candidate
    times = interleaved({"A": ref_fn, "B": cand_fn}, settings, budget_s=budget_s,
                        min_rounds=min_rounds, max_rounds=max_rounds)
    ratio = median_ratio(times["A"], times["B"])
    row: dict[str, Any] = dict(bench=bench, case=case, reference=ref_name, candidate=cand_name,
                               speedup=ratio, rounds=len(times["A"]),
                               ref_median_s=median(times["A"]), cand_median_s=median(times["B"]),
                               ref_spread=spread(times["A"]), cand_spread=spread(times["B"]))
    if tokens is not None:
        row.update(unit="tok/s", ref_value=tokens / row["ref_median_s"], cand_value=tokens / row["cand_median_s"])
    else:
        row.update(unit="s", ref_value=row["ref_median_s"], cand_value=row["cand_median_s"])
    if target is not None:
        row.update(target=target, met=bool(target_check(ratio)) if target_check else None)
    row.update(extra or {})
    return settings.add(**row)
