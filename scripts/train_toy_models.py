#!/usr/bin/env python
"""Train the bundled toy models (``hooked_ssm/pretrained/toy/``) from scratch.

What it does, in order (each step is skipped when its output already exists, unless forced):

1. builds the corpus from this Python installation's own documentation
   (``hooked_ssm/pretrained/toy/corpus.py``: ``pydoc_data.topics`` + standard-library docstrings);
2. trains a byte-level BPE tokenizer (vocabulary 4096; ``<|bos|>``=0, ``<|eos|>``=1,
   ``<|pad|>``=2) on the train split and saves it as a ``PreTrainedTokenizerFast`` in
   ``hooked_ssm/pretrained/toy/tokenizer/`` (``--retrain-tokenizer`` to redo it). The tokenizer
   adds no special tokens by itself: every document is encoded as ``[bos] + ids``;
3. tokenizes the corpus into one token stream per split (documents joined with a ``<|bos|>``
   in front of each) and caches it in ``runs/toy/data.pt``; the train split is further divided
   (by a title hash) into a *fit* part, which is trained on, and a small *dev* part, used only to
   pick the best checkpoint, so that the reported validation loss is untouched by any choice;
4. trains each model with the Hugging Face reference classes (``Qwen3_5ForCausalLM`` for
   ``toy-gdn``, ``Mamba2ForCausalLM`` for ``toy-mamba2``) or, for ``toy-rwkv7`` (no class in
   transformers), with HookedSSM's own pure-torch RWKV-7 (``scripts/toy_rwkv7.py``), on random
   256-token windows of the fit stream, with AdamW, linear warmup and cosine decay,
   deterministic seeds and periodic resumable checkpoints in ``runs/toy/<name>/`` (git-ignored
   scratch);
5. rounds the weights to bfloat16, evaluates the mean next-token cross-entropy (nats) on the
   validation stream (non-overlapping 256-token windows, fp32 compute) and a unigram baseline
   (train-split token frequencies with add-one smoothing, same targets), and saves each model
   as safetensors (``save_pretrained``; BlinkDL's tensor names for ``toy-rwkv7``) plus the
   tokenizer files and a ``README.md`` card; ``MODELS.md`` and ``training_metrics.json``
   summarise all models (a run rewrites the cards of the models it trained only).

Typical use::

    python scripts/train_toy_models.py                        # everything, CPU-sized defaults
    python scripts/train_toy_models.py --device cuda --batch-size 64 --steps 1500
    python scripts/train_toy_models.py --models toy-mamba2 --steps 50   # smoke run
    python scripts/train_toy_models.py --models toy-rwkv7 --device cpu --threads 1 --steps 500

For a run on another machine (where only weights should come back) use ``--weights-only
--out-dir DIR``: it writes ``DIR/<name>/{config.json,generation_config.json,model.safetensors}``
and ``DIR/metrics.json`` only; then ``--finalize-from DIR`` here copies them into the package,
adds the tokenizer files and writes the cards. Carry ``runs/toy/data.pt`` along so both
machines use the same tokens (the corpus depends on the Python version).

This script deliberately imports nothing from ``hooked_ssm`` except the standalone corpus file
(loaded by path), so it runs where only torch + transformers + tokenizers are installed; the
exception is ``toy-rwkv7``, whose helper module (``scripts/toy_rwkv7.py``) is imported only when
that model is asked for.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
TOY_DIR = REPO_ROOT / "hooked_ssm" / "pretrained" / "toy"
TOKENIZER_DIR = TOY_DIR / "tokenizer"
RUNS_DIR = REPO_ROOT / "runs" / "toy"

VOCAB_SIZE = 4096
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>"]  # ids 0, 1, 2
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
SEQ_LEN = 256
DEV_MODULUS, DEV_REMAINDER = 20, 1  # fit/dev division of the train split (by title hash)
MODEL_NAMES = ("toy-gdn", "toy-mamba2", "toy-rwkv7")
RWKV7 = "toy-rwkv7"  # trained through hooked_ssm (scripts/toy_rwkv7.py), not transformers
SAVE_DTYPE = torch.bfloat16


# --------------------------------------------------------------------------------------------
# corpus and tokenizer
# --------------------------------------------------------------------------------------------
def load_corpus_module():
    """Import ``hooked_ssm/pretrained/toy/corpus.py`` by path (without importing hooked_ssm)."""
    spec = importlib.util.spec_from_file_location("_toy_corpus", TOY_DIR / "corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_tasks_module():
    """Import ``hooked_ssm/pretrained/toy/tasks.py`` by path (without importing hooked_ssm)."""
    if "_toy_tasks" not in sys.modules:
        spec = importlib.util.spec_from_file_location("_toy_tasks", TOY_DIR / "tasks.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["_toy_tasks"]


def task_rows(vocab, split: str, seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` rows of SEQ_LEN+1 task tokens (and their memory-target masks) of ``split``."""
    rows = [load_tasks_module().task_stream(vocab, f"{split}:{seed}:{i}", SEQ_LEN + 1) for i in range(n)]
    return torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])


def _is_dev(title: str) -> bool:
    digest = hashlib.blake2b(("dev:" + title).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % DEV_MODULUS == DEV_REMAINDER


def train_tokenizer(train_docs: list[str], out_dir: Path):
    """Train the byte-level BPE tokenizer and save it as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # No post-processor: the tokenizer never adds <|bos|>/<|eos|> itself; callers prepend bos.
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_docs, trainer=trainer, length=len(train_docs))
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [BOS_ID, EOS_ID, PAD_ID]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS[0],
        eos_token=SPECIAL_TOKENS[1],
        pad_token=SPECIAL_TOKENS[2],
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    # transformers 5 writes "TokenizersBackend"; the historical name loads in 4.x and 5.x alike.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return fast


def load_tokenizer(path: Path = TOKENIZER_DIR):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare_data(tokenizer, cache: Path, force: bool = False) -> dict:
    """Token streams for the fit/dev/train/validation splits (int16), cached in ``cache``."""
    tok_sha = _sha256(TOKENIZER_DIR / "tokenizer.json")
    if cache.exists() and not force:
        data = torch.load(cache, map_location="cpu", weights_only=False)
        if data.get("tokenizer_sha256") == tok_sha:
            print(f"[data] using cached tokens {cache} (corpus from Python {data['corpus']['python_version']})")
            return data
        print("[data] cached tokens were made with another tokenizer: rebuilding")
    corpus = load_corpus_module()
    streams: dict[str, list[int]] = {"fit": [], "dev": [], "train": [], "validation": []}
    for split in ("train", "validation"):
        docs = corpus.titled_documents(split)
        encoded = tokenizer([text for _, text in docs], add_special_tokens=False)["input_ids"]
        for (title, _), ids in zip(docs, encoded):
            seq = [BOS_ID] + list(ids)
            streams[split].extend(seq)
            if split == "train":
                streams["dev" if _is_dev(title) else "fit"].extend(seq)
    data = {
        "tokenizer_sha256": tok_sha,
        "corpus": corpus.corpus_stats(),
        **{k: torch.tensor(v, dtype=torch.int16) for k, v in streams.items()},
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, cache)
    sizes = ", ".join(f"{k} {len(v):,}" for k, v in streams.items())
    print(f"[data] tokens: {sizes}; cached in {cache}")
    return data


def eval_windows(stream: torch.Tensor, seq_len: int = SEQ_LEN) -> list[torch.Tensor]:
    """Non-overlapping windows of ``seq_len`` tokens (the last one may be shorter, >= 2)."""
    stream = stream.long()
    return [stream[i : i + seq_len] for i in range(0, len(stream), seq_len) if len(stream[i : i + seq_len]) >= 2]


def unigram_baseline(train: torch.Tensor, validation: torch.Tensor, seq_len: int = SEQ_LEN) -> dict:
    """CE (nats) of the validation targets under the add-one-smoothed train unigram distribution.

    The targets are exactly those the models are scored on: every token of the validation
    windows except each window's first.
    """
    counts = torch.bincount(train.long(), minlength=VOCAB_SIZE).double() + 1.0
    logp = (counts / counts.sum()).log()
    targets = torch.cat([w[1:] for w in eval_windows(validation, seq_len)])
    return {"validation_ce": float(-logp[targets].mean()), "targets": int(targets.numel())}


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
def make_config(name: str):
    if name == "toy-gdn":
        from transformers import Qwen3_5TextConfig

        # Recurrent layers only: a full-attention layer would solve the memory tasks by itself and
        # leave the Gated DeltaNet states with nothing to carry.
        return Qwen3_5TextConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=2,
            layer_types=["linear_attention"] * 2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=32,
            linear_value_head_dim=32,
            linear_conv_kernel_dim=4,
            hidden_act="silu",
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e7,
                "partial_rotary_factor": 0.25,
                "mrope_section": [11, 11, 10],
                "mrope_interleaved": True,
            },
            max_position_embeddings=4096,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
        )
    if name == "toy-mamba2":
        from transformers import Mamba2Config

        # d_model 128 (was 256): small enough to learn the memory tasks in a CPU-sized run.
        return Mamba2Config(
            vocab_size=VOCAB_SIZE,
            hidden_size=128,
            num_hidden_layers=4,
            expand=2,
            head_dim=32,
            num_heads=8,
            state_size=32,
            n_groups=1,
            conv_kernel=4,
            use_bias=False,
            use_conv_bias=True,
            chunk_size=64,
            layer_norm_epsilon=1e-5,
            rms_norm=True,
            residual_in_fp32=True,
            tie_word_embeddings=True,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
        )
    raise KeyError(name)


def rwkv7_module():
    """``scripts/toy_rwkv7.py``, imported by path on first use (it imports hooked_ssm)."""
    if "_toy_rwkv7" not in sys.modules:
        spec = importlib.util.spec_from_file_location("_toy_rwkv7", Path(__file__).with_name("toy_rwkv7.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["_toy_rwkv7"]


def class_name(name: str) -> str:
    return rwkv7_module().MODEL_CLASS if name == RWKV7 else model_class(name).__name__


def model_class(name: str):
    if name == "toy-gdn":
        from transformers import Qwen3_5ForCausalLM

        return Qwen3_5ForCausalLM
    from transformers import Mamba2ForCausalLM

    return Mamba2ForCausalLM


def build_model(name: str, seed: int, device: torch.device | None = None):
    if name == RWKV7:  # HookedSSM moves its inputs to cfg.device, so it is built there
        return rwkv7_module().build_model(seed, VOCAB_SIZE, str(device or "cpu"))
    torch.manual_seed(seed)
    model = model_class(name)(make_config(name))
    if name == "toy-gdn":
        init_gdn_decay_(model)
    return model


@torch.no_grad()
def init_gdn_decay_(model) -> None:
    """Give each Gated DeltaNet head a memory at initialisation, as FLA and Mamba do.

    transformers initialises ``dt_bias = 1`` with ``A`` up to 16, so a head keeps ``exp(-16 * 1.3)``
    of its state per token: the recurrent layers start (and, in a short run, stay) memoryless.
    Here ``dt ~ LogUniform(1e-3, 1e-1)`` (``dt_bias`` its inverse softplus) and ``A ~ U(1, 16)``,
    so the per-token decay starts between about 0.2 and 0.999.
    """
    for name, module in model.named_modules():
        if hasattr(module, "dt_bias") and hasattr(module, "A_log"):
            heads = module.dt_bias.shape[0]
            dt = torch.exp(torch.empty(heads).uniform_(torch.log(torch.tensor(1e-3)), torch.log(torch.tensor(1e-1))))
            module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            module.A_log.copy_(torch.log(torch.empty(heads).uniform_(1.0, 16.0)))


def forward_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    if not hasattr(model, "config"):  # a HookedSSM (toy-rwkv7): token ids in, logits out
        return model(input_ids)
    return model(input_ids=input_ids, use_cache=False).logits


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def lr_at(step: int, total: int, warmup: int, peak: float, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def sample_batch(stream: torch.Tensor, step: int, batch: int, seed: int, vocab=None, n_task: int = 0) -> torch.Tensor:
    """Random windows of SEQ_LEN+1 tokens, the last ``n_task`` rows synthetic task documents
    (``tasks.py``); a pure function of (seed, step), so resumable."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - SEQ_LEN - 1, (batch - n_task,), generator=g)
    idx = starts[:, None] + torch.arange(SEQ_LEN + 1)[None, :]
    text = stream[idx].long()
    if not n_task:
        return text
    tasks, _ = task_rows(vocab, "train", seed * 1_000_003 + step, n_task)
    return torch.cat([text, tasks])


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, device: torch.device, batch: int = 32, autocast: bool = False) -> float:
    """Mean next-token CE (nats) over non-overlapping windows of ``stream``."""
    model.eval()
    windows = eval_windows(stream)
    total, count = 0.0, 0
    full = [w for w in windows if len(w) == SEQ_LEN]
    groups = [torch.stack(full[i : i + batch]) for i in range(0, len(full), batch)]
    groups += [w[None] for w in windows if len(w) != SEQ_LEN]
    for ids in groups:
        ids = ids.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = forward_logits(model, ids[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += ids[:, 1:].numel()
    model.train()
    return total / count


@torch.no_grad()
def evaluate_tasks(model, rows: torch.Tensor, masks: torch.Tensor, device: torch.device, batch: int = 32) -> dict:
    """Loss on task rows and accuracy (argmax) on their memory targets."""
    model.eval()
    total, count, hits, targets = 0.0, 0, 0, 0
    for i in range(0, len(rows), batch):
        ids, mask = rows[i : i + batch].to(device), masks[i : i + batch, 1:].to(device)
        logits = forward_logits(model, ids[:, :-1]).float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
        hits += int(((logits.argmax(-1) == ids[:, 1:]) & mask).sum())
        targets += int(mask.sum())
    model.train()
    return {"task_loss": total / count, "memory_accuracy": hits / max(1, targets), "memory_targets": targets}


def memory_accuracy_by_task(model, vocab, device: torch.device, n: int = 64) -> dict:
    """Accuracy on the memory targets of ``n`` validation documents of each task (one per row)."""
    tasks = load_tasks_module()
    out = {}
    for kind in tasks.TASKS:
        docs = [tasks.task_document(kind, vocab, f"validation:{i}") for i in range(n)]
        width = max(len(d) for d, _ in docs)
        ids = torch.full((n, width), PAD_ID)
        mask = torch.zeros(n, width, dtype=torch.bool)
        for j, (d, m) in enumerate(docs):
            ids[j, : len(d)], mask[j, : len(m)] = torch.tensor(d), torch.tensor(m)
        out[kind] = round(evaluate_tasks(model, ids, mask, device)["memory_accuracy"], 4)
    return out


def param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def rounded_copy(model):
    """A float32 copy of ``model`` whose weights are rounded to SAVE_DTYPE (what gets saved)."""
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.to(SAVE_DTYPE).float())
    return m


def train_one(name: str, data: dict, args, device: torch.device) -> tuple[object, dict]:
    from tqdm.auto import tqdm

    run_dir = RUNS_DIR / name
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "checkpoint.pt"
    seed = args.seed + MODEL_NAMES.index(name)
    model = build_model(name, seed, device).to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    total_steps = args.steps
    warmup = args.warmup_steps if args.warmup_steps > 0 else max(1, int(args.warmup_frac * args.steps))
    run_key = dict(name=name, seed=seed, steps=args.steps, batch=args.batch_size, lr=args.lr,
                   wd=args.weight_decay, warmup=warmup, tokenizer=data["tokenizer_sha256"],
                   task_fraction=args.task_fraction)
    start_step, history, best = 0, [], {"dev_loss": float("inf"), "step": -1, "state": None}
    train_time = 0.0
    if ckpt_path.exists() and not args.fresh:
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ck.get("run_key") == run_key:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            start_step, history, best = ck["step"], ck["history"], ck["best"]
            total_steps, train_time = ck["total_steps"], ck["train_time"]
            print(f"[{name}] resumed from {ckpt_path} at step {start_step}/{total_steps}")
        else:
            print(f"[{name}] ignoring {ckpt_path}: it was made with other settings")

    fit = data["fit"].long()
    dev = data["dev"]
    use_autocast = device.type == "cuda"
    vocab = load_tasks_module().TaskVocabulary.from_tokenizer(load_tokenizer())
    n_task = round(args.task_fraction * args.batch_size)
    dev_tasks = task_rows(vocab, "dev", 0, args.dev_task_rows)
    print(f"[{name}] {n_params:,} parameters; device {device}; batch {args.batch_size} x {SEQ_LEN}; "
          f"{total_steps} steps ({total_steps * args.batch_size * SEQ_LEN / len(fit):.1f} epochs of the fit split)")

    def save_checkpoint(step: int) -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(dict(run_key=run_key, model=model.state_dict(), optimizer=opt.state_dict(), step=step,
                        history=history, best=best, total_steps=total_steps, train_time=train_time), tmp)
        os.replace(tmp, ckpt_path)

    def maybe_eval(step: int) -> None:
        nonlocal best
        # Checkpoint selection: the mean of the dev text loss and the dev task loss (the toy must
        # both model text and read its memory).
        text_loss = evaluate(model, dev, device, autocast=use_autocast)
        task = evaluate_tasks(model, *dev_tasks, device) if n_task else {"task_loss": text_loss, "memory_accuracy": None}
        dev_loss = 0.5 * (text_loss + task["task_loss"])
        history.append({"step": step, "dev_loss": round(dev_loss, 5), "dev_text_loss": round(text_loss, 5),
                        "dev_task_loss": round(task["task_loss"], 5),
                        "dev_memory_accuracy": task["memory_accuracy"] and round(task["memory_accuracy"], 4),
                        "train_loss": round(ema, 5) if ema else None})
        if dev_loss < best["dev_loss"]:
            best = {"dev_loss": dev_loss, "step": step,
                    "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
        bar.write(f"[{name}] step {step}: dev loss {dev_loss:.4f} (text {text_loss:.4f}, tasks {task['task_loss']:.4f}, "
                  f"memory accuracy {task['memory_accuracy']}; best {best['dev_loss']:.4f} @ {best['step']})")

    ema = history[-1]["train_loss"] if history else None
    bar = tqdm(total=total_steps, initial=start_step, desc=name, dynamic_ncols=True,
               mininterval=args.progress_interval)
    t_last = time.perf_counter()
    step = start_step
    calibrated = start_step > 0
    skip = min(5, max(0, args.calibrate_steps - 1))  # steps excluded from the speed measurement
    t_calib = t_last
    while step < total_steps:
        lr = lr_at(step, total_steps, warmup, args.lr, args.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = sample_batch(fit, step, args.batch_size, seed, vocab, n_task).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
            logits = forward_logits(model, batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        if step % 10 == 0 or step == total_steps:
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise FloatingPointError(f"[{name}] non-finite loss at step {step}")
            ema = lv if ema is None else 0.9 * ema + 0.1 * lv
            bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.2e}")
        bar.update(1)
        if not calibrated and step == start_step + skip:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_calib = time.perf_counter()
        if not calibrated and step == start_step + args.calibrate_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            rate = (args.calibrate_steps - skip) / (now - t_calib)
            calibrated = True
            msg = f"[{name}] {rate:.2f} steps/s (steps {skip + 1}-{args.calibrate_steps}; first {skip} took {t_calib - t_last:.1f} s)"
            if args.max_minutes and (now - t_last) + (total_steps - step) / rate > args.max_minutes * 60:
                new_total = max(step + 1, step + int(rate * (args.max_minutes * 60 - (now - t_last))))
                msg += f"; --max-minutes {args.max_minutes}: steps {total_steps} -> {new_total}"
                total_steps = new_total
                bar.total = total_steps
            bar.write(msg)
        if step % args.eval_every == 0 or step == total_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            train_time += now - t_last
            maybe_eval(step)
            t_last = time.perf_counter()
        if step % args.ckpt_every == 0 or step == total_steps:
            save_checkpoint(step)
    bar.close()

    final_dev = history[-1]["dev_loss"] if history else float("nan")
    if best["state"] is not None and best["step"] != total_steps:
        print(f"[{name}] restoring the best dev checkpoint (step {best['step']}, dev {best['dev_loss']:.4f}; "
              f"final dev {final_dev:.4f})")
        model.load_state_dict({k: v.to(device) for k, v in best["state"].items()})
    saved = rounded_copy(model).float()
    if name == RWKV7:  # score what from_pretrained runs: the recurrent form, not the training one
        rwkv7_module().use_exact_recurrence_(saved)
    val_loss = evaluate(saved, data["validation"], device, autocast=False)
    dev_loss = evaluate(saved, dev, device, autocast=False)
    print(f"[{name}] validation loss {val_loss:.4f} nats (dev {dev_loss:.4f}), weights rounded to {SAVE_DTYPE}")
    val_tasks = evaluate_tasks(saved, *task_rows(vocab, "validation", 0, args.dev_task_rows), device)
    by_task = memory_accuracy_by_task(saved, vocab, device)
    print(f"[{name}] validation tasks: loss {val_tasks['task_loss']:.4f}, memory accuracy "
          f"{val_tasks['memory_accuracy']:.4f} ({by_task})")
    metrics = {
        "model_class": class_name(name),
        "parameters": n_params,
        "steps": total_steps,
        "selected_step": best["step"] if best["state"] is not None else total_steps,
        "batch_size": args.batch_size,
        "seq_len": SEQ_LEN,
        "tokens_seen": total_steps * args.batch_size * SEQ_LEN,
        "lr": args.lr,
        "min_lr_ratio": args.min_lr_ratio,
        "warmup_steps": warmup,
        "weight_decay": args.weight_decay,
        "grad_clip": args.grad_clip,
        "seed": seed,
        "eval_every": args.eval_every,
        "train_device": _device_name(device),
        "train_precision": "bf16 autocast, fp32 master weights" if use_autocast else "fp32",
        "train_time_s": round(train_time, 1),
        "final_train_loss_ema": round(ema, 4) if ema is not None else None,
        "dev_loss": round(dev_loss, 4),
        "validation_loss": round(val_loss, 4),
        "task_fraction": args.task_fraction,
        "dev_task_rows": args.dev_task_rows,
        "validation_task_loss": round(val_tasks["task_loss"], 4),
        "validation_memory_accuracy": round(val_tasks["memory_accuracy"], 4),
        "validation_memory_targets": val_tasks["memory_targets"],
        "memory_accuracy_by_task": by_task,
        "saved_dtype": str(SAVE_DTYPE).replace("torch.", ""),
        "history": history,
    }
    return saved, metrics


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})"


def save_model(model, out: Path, weights_only: bool) -> None:
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    if not hasattr(model, "config"):  # toy-rwkv7: BlinkDL's names, see scripts/toy_rwkv7.py
        rwkv7_module().save_blinkdl(model, out, SAVE_DTYPE, BOS_ID, EOS_ID, PAD_ID)
        if not weights_only:
            copy_tokenizer_files(out)
        return
    model = model.to("cpu", SAVE_DTYPE)
    model.config.dtype = SAVE_DTYPE
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model.save_pretrained(str(out), safe_serialization=True)
    if not weights_only:
        copy_tokenizer_files(out)


def copy_tokenizer_files(out: Path) -> None:
    for f in sorted(TOKENIZER_DIR.iterdir()):
        if f.is_file():
            shutil.copy2(f, out / f.name)


# --------------------------------------------------------------------------------------------
# cards
# --------------------------------------------------------------------------------------------
_DESCRIPTIONS = {
    "toy-gdn": ("Gated DeltaNet in the Qwen3.5 format (`Qwen3_5ForCausalLM`), recurrent layers only: 2 Gated "
                "DeltaNet layers (2 key heads shared by 4 value heads, d_k = d_v = 32, conv kernel 4), d_model 128, "
                "SwiGLU MLP 384, tied embeddings. No full-attention layer: it would solve the memory tasks by "
                "itself and leave the recurrent states with nothing to carry. Two layers, so that the demo's "
                "layer 1 (the last) is one of only two places the memory tasks can be solved."),
    "toy-mamba2": ("Mamba-2 (`Mamba2ForCausalLM`): 4 layers, d_model 128, expand 2 (d_inner 256 = 8 heads "
                   "x head_dim 32), d_state 32, 1 B/C group, conv kernel 4, chunk size 64, tied embeddings."),
}
# Card sections that follow "Reproduce", per model.
_NOTES = {
    "toy-gdn": [
        "## Initialisation of the recurrent decay",
        "The Gated DeltaNet heads start with `dt ~ LogUniform(1e-3, 1e-1)` (`dt_bias` its inverse",
        "softplus) and `A ~ U(1, 16)` (`init_gdn_decay_` in the training script), as FLA and Mamba",
        "initialise them. With transformers' default (`dt_bias = 1`, `A` up to 16) a short run leaves the",
        "heads forgetting everything every token (median decay ~0), so states equal the last write.",
    ],
}


def _description(name: str) -> str:
    return rwkv7_module().DESCRIPTION if name == RWKV7 else _DESCRIPTIONS[name]


def _notes(name: str) -> list[str]:
    return rwkv7_module().CARD_NOTES if name == RWKV7 else _NOTES.get(name, [])


def _class_cell(m: dict) -> str:
    if m["model_class"] == "HookedSSM":
        return "`hooked_ssm.HookedSSM` (RWKV-7; transformers has no RWKV-7 class)"
    return f"`transformers.{m['model_class']}`"


def _weights_cell(name: str, m: dict) -> str:
    if name == RWKV7:
        return (f"`model.safetensors` with BlinkDL's tensor names (a `.pth` layout, no pickle), {m['saved_dtype']} "
                "(HookedSSM computes in float32 by default)")
    return f"`model.safetensors`, {m['saved_dtype']} (load with `dtype=torch.float32` for exact fp32 compute)"


def _reproduce_flags(m: dict) -> str:
    if m["train_device"].startswith("cuda"):
        return " --device cuda"
    threads = m["train_device"].removeprefix("cpu (").split(" ")[0]
    return f" --device cpu --threads {threads}" if threads.isdigit() else " --device cpu"


def _card(name: str, m: dict, summary: dict) -> str:
    base = summary["unigram_baseline"]["validation_ce"]
    corpus = summary["corpus"]
    lines = [
        f"# {name}",
        "",
        "A tiny model bundled with `hooked_ssm` so that everything runs offline, on a laptop and in CI.",
        "It is a toy: it has seen a couple of MB of Python documentation"
        + (" and synthetic memory tasks, nothing else." if m.get("task_fraction") else " and nothing else."),
        "",
        _description(name),
        "",
        "| | |",
        "|---|---|",
        f"| class | {_class_cell(m)} |",
        f"| parameters | {m['parameters']:,} |",
        f"| weights | {_weights_cell(name, m)} |",
        f"| tokenizer | byte-level BPE, vocabulary {VOCAB_SIZE}, `<|bos|>`=0 `<|eos|>`=1 `<|pad|>`=2 (no special tokens added automatically: prepend `<|bos|>`) |",
        f"| validation loss (nats/token) | **{m['validation_loss']:.4f}** |",
        f"| unigram baseline (nats/token) | {base:.4f} |",
        f"| dev loss (checkpoint selection) | {m['dev_loss']:.4f} |",
        *_memory_lines(m),
        f"| training | {m['steps']} steps x {m['batch_size']} x {m['seq_len']} tokens ({m['tokens_seen']:,} tokens), AdamW lr {m['lr']:g} (warmup {m['warmup_steps']}, cosine to {m['min_lr_ratio']:g}x), wd {m['weight_decay']:g}, clip {m['grad_clip']:g}, seed {m['seed']} |",
        f"| selected checkpoint | step {m['selected_step']} of {m['steps']} (lowest dev loss, evaluated every few dozen steps), "
        f"{m['selected_step'] * m['batch_size'] * m['seq_len']:,} tokens seen, about "
        f"{m['selected_step'] * m['batch_size'] * m['seq_len'] / summary['tokens']['fit']:.1f} epochs of the {summary['tokens']['fit']:,}-token fit split |",
        f"| trained on | {m['train_device']}, {m['train_precision']}, {m['train_time_s']:.0f} s |",
        f"| corpus | Python {corpus['python_version']} documentation: {corpus['train']['documents']} train / {corpus['validation']['documents']} validation documents ({corpus['train']['characters']:,} / {corpus['validation']['characters']:,} characters) |",
        f"| software | torch {_software(m, summary)['torch']}, transformers {_software(m, summary)['transformers']} |",
        "",
        *_sweep_lines(m),
        "## Data",
        "",
        "The corpus is built at run time from the Python installation's own documentation",
        "(`hooked_ssm/pretrained/toy/corpus.py`: `pydoc_data.topics` plus standard-library docstrings);",
        "no third-party text is involved. Documents whose title hashes to 0 mod 20 form the validation",
        "split; of the rest, those hashing (with another salt) to 1 mod 20 form a *dev* part that is",
        "not trained on and is used only to pick the checkpoint. Training uses random 256-token windows",
        "of the remaining documents, concatenated with `<|bos|>` before each document.",
        "",
        "Losses are the mean next-token cross-entropy over non-overlapping 256-token windows of the",
        "validation token stream, computed in float32 with the saved (rounded) weights. The unigram",
        "baseline scores the same targets with train-split token frequencies (add-one smoothing).",
        "Other Python versions produce a slightly different corpus, so retraining elsewhere gives",
        "slightly different numbers.",
        *([] if not m.get("task_fraction") else [
            "",
            "Synthetic memory tasks (`hooked_ssm/pretrained/toy/tasks.py`) fill part of every batch: associative",
            "recall of word pairs at a distance, copying, induction and bracket matching, whose *memory targets*",
            "(a queried value, a copied word, a repeated successor, a closing bracket) only the earlier context",
            "determines. The dev loss that picks the checkpoint is the mean of the dev text loss and the loss",
            "on dev task rows; the memory accuracy is the argmax accuracy on the memory targets of validation",
            "task rows (seeds never trained on).",
        ]),
        "",
        "## Reproduce",
        "",
        "```",
        f"python scripts/train_toy_models.py --models {name} --steps {m['steps']} --batch-size {m['batch_size']} "
        f"--warmup-steps {m['warmup_steps']} --lr {m['lr']:g} --seed {m['seed'] - MODEL_NAMES.index(name)}"
        + f" --task-fraction {m.get('task_fraction', 0):g}"
        + (f" --dev-task-rows {m['dev_task_rows']}" if m.get("task_fraction") else "")
        + f" --eval-every {_eval_every(m)}"
        + _reproduce_flags(m),
        "```",
        "",
        *_notes(name),
    ]
    return "\n".join(lines)


def _memory_lines(m: dict) -> list[str]:
    """Card rows for a model trained with synthetic memory tasks (``tasks.py``)."""
    if not m.get("task_fraction"):
        return []
    by_task = ", ".join(f"{k} {100 * v:.1f}%" for k, v in m["memory_accuracy_by_task"].items())
    curve = ", ".join(f"{h['step']}: {100 * h['dev_memory_accuracy']:.0f}%" for h in m["history"])
    # The best dev loss within the last evaluation interval: no plateau was seen before the run ended.
    still_improving = m["selected_step"] > m["steps"] - _eval_every(m)
    return [
        f"| dev memory accuracy along training (step: accuracy) | {curve} |",
        *(["| convergence | **not converged**: the dev loss and memory accuracy were still improving at the last "
           "step (a CPU-sized budget) |"] if still_improving else []),
        f"| training mixture | {100 * (1 - m['task_fraction']):.0f}% corpus text windows, {100 * m['task_fraction']:.0f}% synthetic memory-task rows (`tasks.py`) per batch |",
        f"| validation task loss (nats/token) | {m['validation_task_loss']:.4f} |",
        f"| memory accuracy (validation task rows, argmax) | **{100 * m['validation_memory_accuracy']:.1f}%** of {m['validation_memory_targets']:,} memory targets |",
        f"| memory accuracy per task (64 validation documents each) | {by_task} |",
    ]


def _software(m: dict, summary: dict) -> dict:
    return m.get("software") or summary["software"]


def _eval_every(m: dict) -> int:
    if "eval_every" in m:
        return int(m["eval_every"])
    return int(m["history"][0]["step"]) if m.get("history") else 100


def _sweep_lines(m: dict) -> list[str]:
    """Card lines for a run chosen among several (``sweep_selected_from``, added by a sweep driver)."""
    sweep = m.get("sweep_selected_from")
    if not sweep:
        return []
    lines = [
        "## Run selection",
        "",
        "Several runs (different total step counts, same everything else) were trained; the one with",
        "the lowest dev loss was kept. Validation losses are shown for information only; they played",
        "no part in the choice. The fit split is small, so every run overfits after a few epochs and",
        "the best dev checkpoint comes early, before the learning rate has decayed.",
        "",
        "| total steps | dev loss | validation loss | train time (s) |",
        "|---|---|---|---|",
    ]
    for r in sorted(sweep, key=lambda r: r["steps"]):
        mark = " (kept)" if r["steps"] == m["steps"] else ""
        lines.append(f"| {r['steps']}{mark} | {r['dev_loss']:.4f} | {r['validation_loss']:.4f} | {r['train_time_s']:.0f} |")
    return lines + [""]


def write_summary(summary: dict, cards=None) -> None:
    """MODELS.md and training_metrics.json for all models; README cards for ``cards`` (default all),
    so that a run leaves the cards of models it did not train (and any hand edits) alone."""
    base = summary["unigram_baseline"]["validation_ce"]
    rows = [
        "# Bundled toy models",
        "",
        "Trained by `scripts/train_toy_models.py` on the Python documentation corpus (and, where a",
        "memory accuracy is shown, synthetic memory tasks: `tasks.py`)",
        f"(Python {summary['corpus']['python_version']}); tokenizer in `tokenizer/` (byte-level BPE, {VOCAB_SIZE} tokens).",
        "Validation loss: mean next-token cross-entropy in nats over the validation split",
        f"({summary['unigram_baseline']['targets']:,} target tokens). Unigram baseline: train-split token",
        "frequencies with add-one smoothing on the same targets.",
        "",
        "| model | class | parameters | weights | selected step / steps (batch x seq) | validation loss | unigram baseline | memory accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in summary["models"].items():
        rows.append(
            f"| `{name}` | `{m['model_class']}` | {m['parameters']:,} | {m['saved_dtype']} | "
            f"{m['selected_step']} / {m['steps']} ({m['batch_size']} x {m['seq_len']}) | **{m['validation_loss']:.4f}** | {base:.4f} | "
            + (f"{100 * m['validation_memory_accuracy']:.1f}% |" if m.get("task_fraction") else "not trained on tasks |")
        )
    rows += ["", "Each model's `README.md` has its training details. Trained on:", ""]
    rows += [f"- `{name}`: {m['train_device']}, {m['train_precision']}, {m['train_time_s']:.0f} s"
             for name, m in summary["models"].items()]
    if RWKV7 in summary["models"]:
        rows += ["", f"`{RWKV7}` has no transformers class: it was trained as a `HookedSSM` (pure-torch RWKV-7,",
                 "chunked form for the training forward, tested equal to the recurrence) and is saved with",
                 "BlinkDL's tensor names in safetensors; its logits match BlinkDL's `rwkv` package."]
    rows.append("")
    (TOY_DIR / "MODELS.md").write_text("\n".join(rows))
    slim = {**summary, "models": {k: {kk: vv for kk, vv in v.items()} for k, v in summary["models"].items()}}
    (TOY_DIR / "training_metrics.json").write_text(json.dumps(slim, indent=1) + "\n")
    for name, m in summary["models"].items():
        if cards is None or name in cards:
            (TOY_DIR / name / "README.md").write_text(_card(name, m, summary))


def merge_summary(new: dict) -> dict:
    """Merge ``new`` into the existing training_metrics.json (models trained earlier stay)."""
    path = TOY_DIR / "training_metrics.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("tokenizer_sha256") == new.get("tokenizer_sha256"):
            # models kept from the old summary keep the software they were trained with
            kept = {k: {**v, "software": v.get("software", old.get("software"))} for k, v in old.get("models", {}).items()}
            models = {**kept, **new["models"]}
            new = {**new, "models": {k: models[k] for k in MODEL_NAMES if k in models}}
    return new


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODEL_NAMES), help="comma-separated subset of " + ",".join(MODEL_NAMES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per model (default 600: CPU-sized)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences of 256 tokens per step (default 16)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-frac", type=float, default=0.05, help="warmup steps as a fraction of --steps")
    p.add_argument("--warmup-steps", type=int, default=0, help="warmup steps (overrides --warmup-frac when > 0)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--task-fraction", type=float, default=0.5,
                   help="fraction of each batch made of synthetic memory tasks (hooked_ssm/pretrained/toy/tasks.py)")
    p.add_argument("--dev-task-rows", type=int, default=64, help="task rows for dev selection and validation scores")
    p.add_argument("--eval-every", type=int, default=100, help="dev-loss evaluation (and best-checkpoint) interval")
    p.add_argument("--ckpt-every", type=int, default=100, help="resumable checkpoint interval (runs/toy/<name>/)")
    p.add_argument("--calibrate-steps", type=int, default=20, help="steps after which the speed is measured")
    p.add_argument("--max-minutes", type=float, default=0.0, help="cap a model's steps to fit this many minutes (0: off)")
    p.add_argument("--progress-interval", type=float, default=2.0, help="seconds between progress-bar refreshes")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints in runs/toy/")
    p.add_argument("--retrain-tokenizer", action="store_true")
    p.add_argument("--data", type=Path, default=RUNS_DIR / "data.pt", help="token cache (default runs/toy/data.pt)")
    p.add_argument("--out-dir", type=Path, default=TOY_DIR, help="where model directories are written")
    p.add_argument("--weights-only", action="store_true",
                   help="write only config.json, generation_config.json, model.safetensors per model and metrics.json")
    p.add_argument("--finalize-from", type=Path, default=None,
                   help="no training: install models + metrics.json written by a --weights-only run into the package")
    p.add_argument("--prepare-only", action="store_true", help="only build the tokenizer and the token cache")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for n in names:
        if n not in MODEL_NAMES:
            raise SystemExit(f"unknown model {n!r}; choose from {MODEL_NAMES}")

    if args.finalize_from is not None:
        return finalize(args.finalize_from, names)

    if args.retrain_tokenizer or not (TOKENIZER_DIR / "tokenizer.json").exists():
        corpus = load_corpus_module()
        t0 = time.perf_counter()
        train_tokenizer(corpus.build_corpus()["train"], TOKENIZER_DIR)
        print(f"[tokenizer] trained in {time.perf_counter() - t0:.1f} s -> {TOKENIZER_DIR}")
    tokenizer = load_tokenizer()
    data = prepare_data(tokenizer, args.data, force=args.retrain_tokenizer)
    if args.prepare_only:
        return 0

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    import transformers

    summary = {
        "tokenizer_sha256": data["tokenizer_sha256"],
        "corpus": data["corpus"],
        "tokens": {k: int(len(data[k])) for k in ("train", "fit", "dev", "validation")},
        "unigram_baseline": unigram_baseline(data["train"], data["validation"]),
        "software": {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__},
        "models": {},
    }
    print(f"[baseline] unigram validation CE {summary['unigram_baseline']['validation_ce']:.4f} nats")
    for name in names:
        model, metrics = train_one(name, data, args, device)
        summary["models"][name] = metrics
        save_model(model, args.out_dir / name, args.weights_only)
        if args.weights_only:
            (args.out_dir / "metrics.json").write_text(json.dumps(summary, indent=1) + "\n")
    if not args.weights_only and args.out_dir.resolve() == TOY_DIR:
        write_summary(merge_summary(summary), cards=list(summary["models"]))
    elif not args.weights_only:
        (args.out_dir / "metrics.json").write_text(json.dumps(summary, indent=1) + "\n")
    for name, m in summary["models"].items():
        print(f"{name}: validation {m['validation_loss']:.4f} nats vs unigram {summary['unigram_baseline']['validation_ce']:.4f}")
    return 0


def finalize(src: Path, names: list[str]) -> int:
    summary = json.loads((src / "metrics.json").read_text())
    tok_sha = _sha256(TOKENIZER_DIR / "tokenizer.json")
    if summary["tokenizer_sha256"] != tok_sha:
        raise SystemExit("the weights were trained with another tokenizer than hooked_ssm/pretrained/toy/tokenizer/")
    summary["models"] = {k: v for k, v in summary["models"].items() if k in names}
    for name in summary["models"]:
        dst = TOY_DIR / name
        dst.mkdir(parents=True, exist_ok=True)
        for f in ("config.json", "generation_config.json", "model.safetensors"):
            if (src / name / f).exists():
                shutil.copyfile(src / name / f, dst / f)
        copy_tokenizer_files(dst)
    write_summary(merge_summary(summary), cards=list(summary["models"]))
    print(f"installed {list(summary['models'])} into {TOY_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
