"""A tour of HookedSSM on a bundled toy model: hooks, the cache write, an exact write edit, decoding.

Run with ``python -m hooked_ssm.demo [--model toy-gdn] [--layer L] [--head H]``. Everything runs
offline on the CPU in a few seconds; ``--model`` also takes a checkpoint directory or Hub id.
"""

from __future__ import annotations

import argparse

import torch

from hooked_ssm import HookedSSM, as_flat, as_matrix

PROMPT = "Return the number of items in a container. The argument may be a sequence"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-gdn")
    parser.add_argument("--layer", type=int, default=None, help="recurrent layer to edit (default: the first)")
    parser.add_argument("--head", type=int, default=0)
    parser.add_argument("--text", default=PROMPT)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = HookedSSM.from_pretrained(args.model, device="cpu")
    cfg = model.cfg
    recurrent = [i for i, kind in enumerate(cfg.layer_types) if kind != "full_attention"]
    layer = args.layer if args.layer is not None else recurrent[0]
    if layer not in recurrent:
        raise SystemExit(f"Layer {layer} is {cfg.layer_types[layer]!r}; pick a recurrent layer: {recurrent}.")
    mixer = f"blocks.{layer}.mixer"
    print(f"Loaded {cfg.model_name}: {cfg.n_layers} layers {cfg.layer_types}, d_model={cfg.d_model}, "
          f"{cfg.n_heads} value heads of d_k={cfg.d_k}, d_v={cfg.d_v}")
    print(f"Hook points of {mixer}: {[n.split('.')[-1] for n in model.hook_dict if n.startswith(mixer + '.')]}")

    tokens = model.to_tokens(args.text)
    length = tokens.shape[1]
    with torch.no_grad():
        loss, cache = model.run_with_cache(
            tokens, return_type="loss", names_filter=[f"{mixer}.hook_write", f"{mixer}.hook_state"]
        )
    writes = as_matrix(cache[f"{mixer}.hook_write"], cfg.d_k, cfg.d_v)[0, :, args.head]
    states = as_matrix(cache[f"{mixer}.hook_state"], cfg.d_k, cfg.d_v)[0, :, args.head]
    print(f"\n{length} tokens, loss {loss.item():.3f} nats/token")
    print(f"Head {args.head}: write ||k_w v_w^T||_F per token (first 8): "
          f"{[round(x, 3) for x in writes.flatten(1).norm(dim=-1)[:8].tolist()]}")
    print(f"  every write has matrix rank {sorted(set(torch.linalg.matrix_rank(writes).tolist()))}; "
          f"final state rank {torch.linalg.matrix_rank(states[-1]).item()} of {min(cfg.d_k, cfg.d_v)}")

    # Delete the write at one position: the past is untouched, every later prediction moves.
    position = length // 2

    def delete_write(write, hook):
        write[:, position, args.head] = 0.0
        return write

    with torch.no_grad():
        clean = model(tokens)
        edited = model.run_with_hooks(tokens, fwd_hooks=[(f"{mixer}.hook_write", delete_write)])
    shift = (edited - clean).abs().amax(dim=-1)[0]
    print(f"\nDeleting the write of head {args.head} at position {position} ({model.to_str_tokens(tokens[0])[position]!r}):")
    print(f"  max |logit shift| before it: {shift[:position].max().item():.2e}; "
          f"at and after it: {shift[position:].max().item():.3f}")

    # Install a rank-1 matrix instead: the same machinery WriteSAE atoms use.
    u, w = torch.randn(cfg.d_k), torch.randn(cfg.d_v)
    atom = as_flat(torch.outer(u / u.norm(), w / w.norm())) * writes[position].norm()

    def install(write, hook):
        write[:, position, args.head] = atom
        return write

    with torch.no_grad():
        installed = model.run_with_hooks(tokens, fwd_hooks=[(f"{mixer}.hook_write", install)])
    print(f"  replacing it by a random unit rank-1 atom at the native norm shifts the next-token logits by up to "
          f"{(installed - clean)[0, position:].abs().max().item():.3f}")

    text = model.generate(args.text, max_new_tokens=20, do_sample=False, verbose=False)
    print(f"\nGreedy continuation with the O(1) recurrent state:\n  {text!r}")


if __name__ == "__main__":
    main()
