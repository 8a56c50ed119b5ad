"""``HookedSSM``: a TransformerLens-style hooked model for recurrent-state (hybrid) language models."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import ActivationCache, HookedRootModule
from transformer_lens.HookedTransformer import Output
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import USE_DEFAULT_VALUE, Slice, lm_cross_entropy_loss, sample_logits
from transformers import PreTrainedTokenizerBase

from hooked_ssm.components.block import build_blocks, build_final_norm
from hooked_ssm.components.embed import Embed, Unembed
from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.families import layer_kind
from hooked_ssm.hook_checks import CheckedHook, raise_if_non_finite
from hooked_ssm.hook_names import resolve_hook_name
from hooked_ssm.state import RecurrentState

TextOrTokens = str | list[str] | Int[Tensor, "batch pos"] | Int[Tensor, "pos"]
ReturnType = Literal["logits", "loss", "both"] | None
# Hooks whose position dim may already be a selection (see `state_positions`).
_STATE_HOOK_SUFFIX = "hook_state"
# Attention patterns are [batch, head, query_pos, key_pos]: their query position is dim 2.
_QUERY_POS_DIM2_SUFFIXES = ("hook_attn_scores", "hook_pattern")
# Hook points that ``check_finite`` leaves alone: hooking them changes what a forward computes
# (states and writes are materialised only when hooked; a pattern hook turns fused attention off).
_NOT_FINITE_CHECKED = ("hook_state", "hook_write", "hook_write_factors", "hook_delta_v", "hook_attn_scores",
                       "hook_pattern")


class HookedSSM(HookedRootModule):
    """A recurrent (or hybrid) LM with every per-token quantity of its recurrence exposed as a HookPoint.

    Mirrors ``HookedTransformer``: ``forward``, ``run_with_hooks``, ``run_with_cache``, ``hooks``,
    ``generate``, the tokenizer helpers and the weight properties. Recurrent mixers (Gated
    DeltaNet, Mamba-2, RWKV-7) live at ``blocks.{l}.mixer`` with one hook vocabulary
    (``hook_q/k/v/decay/gate/write/state/read/z`` plus family-specific ones); full attention
    layers of hybrids at ``blocks.{l}.attn``.
    """

    def __init__(
        self,
        cfg: HookedSSMConfig,
        tokenizer: PreTrainedTokenizerBase | None = None,
        move_to_device: bool = True,
    ):
        super().__init__()
        self.cfg = cfg
        self.embed = Embed(cfg.d_vocab, cfg.d_model, cfg.embedding_multiplier)
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        self.blocks = nn.ModuleList(build_blocks(cfg))
        # Blocks that read the token embeddings besides the residual stream (Zamba2's hybrid layers).
        self.reads_embeddings = [layer_kind(name).reads_embeddings for name in cfg.layer_types]
        # Blocks that read the token ids (Qwen4-Exp's Per-Layer Embeddings).
        self.reads_tokens = [layer_kind(name).reads_tokens for name in cfg.layer_types]
        self.ln_final = build_final_norm(cfg)
        self.unembed = Unembed(cfg.d_vocab, cfg.d_model, cfg.logits_divisor, cfg.output_logits_soft_cap)
        if cfg.tie_word_embeddings:
            self.unembed.weight = self.embed.W_E
        self.tokenizer: PreTrainedTokenizerBase | None = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)
        # Absolute index of position 0 of the running forward call (non-zero while decoding with a
        # RecurrentState), so hooks can target absolute positions during generation.
        self.current_position_offset = 0
        if move_to_device:
            self.to(cfg.device, cfg.dtype)
        self.setup()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model_name_or_path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        **config_overrides: Any,
    ) -> "HookedSSM":
        """Load a Hugging Face checkpoint (a local directory or a Hub id) or a bundled toy model.

        ``config_overrides`` set HookedSSMConfig fields (e.g. ``execution="recurrent"``).
        """
        from hooked_ssm.pretrained import load_pretrained

        return load_pretrained(cls, model_name_or_path, device, dtype, tokenizer, **config_overrides)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input: TextOrTokens,
        return_type: ReturnType = "logits",
        loss_per_token: bool = False,
        prepend_bos: bool | None = USE_DEFAULT_VALUE,
        padding_side: Literal["left", "right"] | None = USE_DEFAULT_VALUE,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        past_state: RecurrentState | None = None,
        state_positions: Sequence[int] | None = None,
        v_first: Float[Tensor, "batch pos head d_v"] | None = None,
        check_finite: bool = False,
        embeddings: Float[Tensor, "batch pos d_model"] | None = None,
        tokens: Int[Tensor, "batch pos"] | None = None,
    ) -> Any:
        """Run the model.

        Args:
            input: text, a list of texts, or token ids ``[batch, pos]`` / ``[pos]``; with
                ``start_at_layer``, the residual stream entering that block ``[batch, pos, d_model]``
                (``[batch, pos, hc_count * d_model]`` with hyper-connections).
                A list of texts of different lengths is padded (``padding_side``) and masked, as in
                HookedTransformer.
            return_type: "logits", "loss" (mean next-token loss over real tokens), "both"
                (``Output(logits, loss)``) or None.
            attention_mask: ``[batch, pos]`` (or ``[batch, past + pos]`` with a ``past_state``), 1 for
                real tokens, 0 for pads. Pads write nothing into any recurrent state (left or right
                padding), attention ignores them and the loss leaves them out. Built from the
                tokenizer for text input.
            start_at_layer: run only blocks ``[start_at_layer, ...)`` on the residual stream ``input``
                (TransformerLens's convention); only those blocks' caches in ``past_state`` are read
                and advanced. ``return_type="loss"`` needs tokens, so it is refused here.
            stop_at_layer: run only blocks ``[.., stop_at_layer)`` and return the residual stream.
                ``past_state.n_tokens`` advances when the run reaches the last block (every cache
                has then consumed the tokens), also when ``stop_at_layer == n_layers``.
            past_state: a ``RecurrentState`` to continue from; it is updated in place.
            v_first: RWKV-7 with ``start_at_layer >= 1``: layer 0's value for these positions (the
                value residual later layers mix in; ``blocks.0.mixer.hook_v_first``).
            embeddings: Zamba2 with ``start_at_layer >= 1``: the token embeddings of these positions
                (``hook_embed``), which its hybrid layers read besides the residual stream.
            state_positions: positions (of this call) at which ``hook_state`` materialises the state.
                Default: every position. Only paid for when ``hook_state`` has hooks.
            check_finite: raise at the first hook point where a NaN or an infinity appears (see
                ``detect_non_finite``).
            tokens: with ``start_at_layer``, the token ids of these positions, for blocks that read
                them (Qwen4-Exp's Per-Layer Embeddings), as TransformerLens's ``tokens=``.
        """
        if check_finite:
            with self.detect_non_finite():
                return self.forward(input, return_type, loss_per_token, prepend_bos, padding_side, attention_mask,
                                    start_at_layer, stop_at_layer, past_state, state_positions, v_first,
                                    embeddings=embeddings, tokens=tokens)
        first = 0 if start_at_layer is None else self._check_start_layer(start_at_layer, input, return_type, v_first,
                                                                          embeddings, tokens)
        if first > 0:
            resid = input.to(self.cfg.device)
            embeddings = None if embeddings is None else embeddings.to(self.cfg.device)
            block_tokens = None if tokens is None else self._check_tokens(self._check_token_shape(tokens))
            tokens = None
        else:
            if isinstance(input, (str, list)):
                tokens, text_mask = self._tokenize(input, prepend_bos, padding_side)
                attention_mask = text_mask if attention_mask is None else attention_mask
            else:
                tokens = self._check_token_shape(input)
            tokens = block_tokens = self._check_tokens(tokens)
            resid = None
        length = resid.shape[1] if tokens is None else tokens.shape[1]
        if state_positions is not None:
            state_positions = self._check_positions(state_positions, length)
        attention_mask = self._check_attention_mask(attention_mask, resid if tokens is None else tokens, past_state)
        if return_type in ("loss", "both") and tokens is not None:
            self._check_loss_input(tokens, attention_mask)
        self.current_position_offset = 0 if past_state is None else past_state.n_tokens

        if tokens is not None:
            resid = embeddings = self.hook_embed(self.embed(tokens))
            if self.cfg.hc_count > 1:  # hyper-connections: every stream starts as the embedding
                resid = resid.repeat(1, 1, self.cfg.hc_count)
        if v_first is not None:
            self.blocks[0].mixer.value_residual.value = v_first.to(self.cfg.device)
        last = len(self.blocks) if stop_at_layer is None else stop_at_layer
        for layer in range(first, last):
            cache = None if past_state is None else past_state.layers[layer]
            side_inputs = {"embeddings": embeddings} if self.reads_embeddings[layer] else {}
            if self.reads_tokens[layer]:
                side_inputs["tokens"] = block_tokens
            resid = self.blocks[layer](resid, cache, attention_mask, state_positions, **side_inputs)
        if past_state is not None and last == len(self.blocks):
            past_state.n_tokens += length
        if stop_at_layer is not None:
            return resid
        if return_type is None:
            return None
        logits = self.unembed(self.ln_final(resid))
        if return_type == "logits":
            return logits
        mask = None if attention_mask is None else attention_mask[:, -tokens.shape[1] :]
        loss = lm_cross_entropy_loss(logits, tokens, mask, per_token=loss_per_token)
        return loss if return_type == "loss" else Output(logits, loss)

    @staticmethod
    def _check_token_shape(tokens: Tensor) -> Int[Tensor, "batch pos"]:
        if not isinstance(tokens, Tensor):
            raise TypeError(
                f"input must be a string, a list of strings, or a tensor of token ids; got {type(tokens).__name__}."
            )
        if tokens.dim() not in (1, 2):
            raise ValueError(
                f"Token ids must have shape [batch, pos] or [pos], got {tuple(tokens.shape)} ({tokens.dim()}-D). "
                f"Reshape to [batch, pos] (e.g. tokens.flatten(0, -2) for several batches)."
            )
        tokens = tokens if tokens.dim() == 2 else tokens.unsqueeze(0)
        if tokens.shape[1] == 0 or tokens.shape[0] == 0:
            raise ValueError(f"The input holds no tokens (shape {tuple(tokens.shape)}); pass at least one token.")
        return tokens

    def _check_start_layer(self, start_at_layer: int, input: Any, return_type: ReturnType, v_first: Tensor | None,
                           embeddings: Tensor | None, tokens: Tensor | None) -> int:
        if not 0 <= start_at_layer <= len(self.blocks):
            raise ValueError(f"start_at_layer={start_at_layer} is outside [0, {len(self.blocks)}] (the model has {len(self.blocks)} blocks).")
        if start_at_layer == 0:
            return 0
        if not isinstance(input, Tensor) or input.dim() != 3 or input.shape[-1] != self.cfg.d_resid:
            raise TypeError(f"With start_at_layer={start_at_layer}, input must be the residual stream [batch, pos, {self.cfg.d_resid}] "
                            f"entering that block (e.g. from stop_at_layer={start_at_layer} or hook_resid_pre).")
        if return_type in ("loss", "both"):
            raise ValueError("return_type='loss' needs token ids; with start_at_layer use return_type='logits' and your own targets.")
        if "rwkv7" in self.cfg.layer_types and v_first is None:
            raise ValueError("RWKV-7 blocks >= 1 mix in layer 0's value: pass v_first= (blocks.0.mixer.hook_v_first of these positions).")
        if any(self.reads_embeddings[start_at_layer:]) and embeddings is None:
            raise ValueError("Zamba2's hybrid layers read the token embeddings besides the residual stream: pass "
                             "embeddings= (hook_embed of these positions).")
        if any(self.reads_tokens[start_at_layer:]) and tokens is None:
            raise ValueError("Qwen4-Exp's Per-Layer Embeddings read the token ids besides the residual stream: pass "
                             "tokens= (the token ids of these positions).")
        if embeddings is not None and embeddings.shape != input.shape:
            raise ValueError(f"embeddings has shape {tuple(embeddings.shape)}, the residual stream {tuple(input.shape)}: "
                             f"pass hook_embed of the same positions.")
        return start_at_layer

    def _check_tokens(self, tokens: Tensor) -> Tensor:
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"Token ids must be an integer tensor, got {tokens.dtype}. Use tokens.long().")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.cfg.d_vocab):
            raise ValueError(
                f"Token ids must lie in [0, {self.cfg.d_vocab}) (d_vocab); got values in "
                f"[{int(tokens.min())}, {int(tokens.max())}]. Was the input tokenized for another model?"
            )
        return tokens.to(self.cfg.device)

    @staticmethod
    def _check_attention_mask(
        mask: Tensor | None, tokens: Tensor, past_state: RecurrentState | None
    ) -> Bool[Tensor, "batch pos"] | None:
        """The mask as booleans on the tokens' device, or None when it masks nothing (the fast path)."""
        if mask is None:
            return None
        past = 0 if past_state is None else past_state.n_tokens
        allowed = {(tokens.shape[0], tokens.shape[1]), (tokens.shape[0], past + tokens.shape[1])}
        if tuple(mask.shape) not in allowed:
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)}; expected {tuple(tokens.shape)} (one entry per token"
                + (f", or [batch, {past + tokens.shape[1]}] to also cover the past_state's tokens)." if past else ").")
            )
        if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("attention_mask must hold only 0 (pad) and 1 (real token).")
        mask = mask.to(tokens.device).bool()
        if bool(mask.all()):
            return None
        if past and not bool(mask[:, -tokens.shape[1] :].all()):
            raise ValueError(
                "Pads inside a continued sequence (a past_state that already holds tokens) would leave a gap in its "
                "conv windows and token shifts: pad only the first call, on the left (padding_side='left')."
            )
        if past_state is not None and bool((~mask[:, 1:] & mask[:, :-1]).any()):
            raise ValueError(
                "A right-padded batch cannot be continued from its RecurrentState (its conv windows and token shifts "
                "would end on pads): pad on the left (padding_side='left') to decode or continue."
            )
        return mask

    @staticmethod
    def _check_loss_input(tokens: Tensor, mask: Tensor | None) -> None:
        if mask is not None:
            mask = mask[:, -tokens.shape[1] :]
        n_pairs = tokens.shape[0] * (tokens.shape[1] - 1) if mask is None else int((mask[:, 1:] & mask[:, :-1]).sum())
        if n_pairs == 0:
            raise ValueError(
                f"The loss needs at least two (real) tokens in a row to predict one from the other; the input has "
                f"shape {tuple(tokens.shape)}. Pass a longer input, or return_type='logits'."
            )

    @staticmethod
    def _check_positions(positions: Sequence[int], length: int) -> list[int]:
        resolved = [int(p) + length if int(p) < 0 else int(p) for p in positions]
        if any(not 0 <= p < length for p in resolved):
            raise ValueError(
                f"state_positions {list(positions)} fall outside a sequence of {length} tokens; pass positions in "
                f"[-{length}, {length})."
            )
        return resolved

    # ------------------------------------------------------------------ hooks
    def add_hook(self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False) -> None:
        if isinstance(name, str):
            name = resolve_hook_name(name, self.hook_dict)
        super().add_hook(name, hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def _enable_hook_with_name(self, name: str, hook, dir) -> None:
        # Used by `hooks()` / `run_with_hooks`: same name checks as `add_hook`.
        super()._enable_hook_with_name(resolve_hook_name(name, self.hook_dict), CheckedHook(hook) if dir == "fwd" else hook, dir)

    def check_and_add_hook(self, hook_point, hook_point_name, hook, dir="fwd", is_permanent=False, level=None,
                           prepend=False) -> None:
        # Used by `add_hook` (by name or by filter): forward hooks get their return value checked.
        hook = CheckedHook(hook) if dir == "fwd" else hook
        super().check_and_add_hook(hook_point, hook_point_name, hook, dir, is_permanent, level, prepend)

    @contextmanager
    def detect_non_finite(self) -> Iterator[None]:
        """Within this context, a forward raises ``NonFiniteActivationError`` at the first hook point
        (in execution order) whose activation holds a NaN or an infinity, naming it and the index.

        Hook points that are only materialised when hooked (``hook_state``, ``hook_write``,
        ``hook_write_factors``, ``hook_delta_v``) and attention patterns are not checked, so the
        forward computes what it computes without the check.
        """
        checked = lambda name: not name.endswith(_NOT_FINITE_CHECKED)  # noqa: E731
        with self.hooks(fwd_hooks=[(checked, raise_if_non_finite)]):
            yield

    def run_with_cache(
        self,
        *model_args: Any,
        names_filter: str | list[str] | Any = None,
        device: str | torch.device | None = None,
        remove_batch_dim: bool = False,
        incl_bwd: bool = False,
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        pos_slice: Slice | int | list[int] | tuple | None = None,
        return_cache_object: bool = True,
        **model_kwargs: Any,
    ) -> tuple[Any, ActivationCache | dict[str, Tensor]]:
        """Run the model and cache activations (an ``ActivationCache`` by default).

        ``pos_slice`` selects positions on the position dim (dim 1, or dim 2 of attention patterns).
        When it is given, ``hook_state`` materialises only the selected positions instead of the
        whole trajectory.
        """
        if isinstance(names_filter, str):
            names_filter = [names_filter]
        if isinstance(names_filter, list):
            names_filter = [resolve_hook_name(name, self.hook_dict) for name in names_filter]
        positions = None
        if pos_slice is not None:
            pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
            if "state_positions" not in model_kwargs:
                length = self._input_length(model_args[0] if model_args else model_kwargs["input"], model_kwargs)
                positions = pos_slice.indices(length).tolist()
                model_kwargs["state_positions"] = positions
        out, cache = super().run_with_cache(
            *model_args,
            names_filter=names_filter,
            device=device,
            remove_batch_dim=remove_batch_dim,
            incl_bwd=incl_bwd,
            reset_hooks_end=reset_hooks_end,
            clear_contexts=clear_contexts,
            **model_kwargs,
        )
        if pos_slice is not None:
            cache = {name: self._slice_positions(name, act, pos_slice, remove_batch_dim, positions is not None)
                     for name, act in cache.items()}
        if return_cache_object:
            cache = ActivationCache(cache, self, has_batch_dim=not remove_batch_dim)
        return out, cache

    def _input_length(self, input: Any, model_kwargs: dict[str, Any]) -> int:
        if isinstance(input, (str, list)):
            input = self.to_tokens(input, prepend_bos=model_kwargs.get("prepend_bos"))
        return input.shape[-1]

    @staticmethod
    def _slice_positions(name: str, act: Tensor, pos_slice: Slice, no_batch: bool, states_selected: bool) -> Tensor:
        if states_selected and name.removesuffix("_grad").endswith(_STATE_HOOK_SUFFIX):
            return act  # already materialised at the selected positions only
        dim = 2 if name.removesuffix("_grad").endswith(_QUERY_POS_DIM2_SUFFIXES) else 1
        dim -= int(no_batch)
        return pos_slice.apply(act, dim=dim) if act.dim() > dim else act

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input: TextOrTokens = "",
        max_new_tokens: int = 10,
        stop_at_eos: bool = True,
        eos_token_id: int | None = None,
        do_sample: bool = True,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        freq_penalty: float = 0.0,
        use_past_kv_cache: bool = True,
        prepend_bos: bool | None = USE_DEFAULT_VALUE,
        padding_side: Literal["left", "right"] | None = USE_DEFAULT_VALUE,
        return_type: Literal["input", "str", "tokens"] = "input",
        verbose: bool = True,
    ) -> Int[Tensor, "batch pos_plus_new"] | str | list[str]:
        """Sample (or greedily decode with ``do_sample=False``) ``max_new_tokens`` tokens.

        With ``use_past_kv_cache`` (default) each new token costs one step of the recurrence via a
        ``RecurrentState``; otherwise the whole sequence is re-run each step. Hooks stay live, so an
        edit installed during decoding takes effect (``current_position_offset`` gives the absolute
        position of the token being processed).
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}.")
        text_input = isinstance(input, (str, list))
        mask = None
        if text_input:
            if padding_side == "right":
                raise ValueError(
                    "generate pads a batch of texts on the left, so every row's new tokens follow its last real "
                    "token; padding_side='right' would put them after the pads. Leave padding_side unset."
                )
            tokens, mask = self._tokenize(input, prepend_bos, "left")
            mask = None if bool(mask.all()) else mask
        else:
            tokens = self._check_token_shape(input)
        tokens = self._check_tokens(tokens)
        if stop_at_eos and eos_token_id is None:
            eos_token_id = self.cfg.eos_token_id if self.tokenizer is None else self.tokenizer.eos_token_id
            if eos_token_id is None:
                raise ValueError("stop_at_eos=True needs an eos_token_id (the model's tokenizer has none).")
        finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        state = RecurrentState.empty(self.cfg.layer_types) if use_past_kv_cache else None
        new_tokens = tokens
        for _ in tqdm(range(max_new_tokens), disable=not verbose):
            logits = self.forward(new_tokens if use_past_kv_cache else tokens, past_state=state, attention_mask=mask)[:, -1]
            if do_sample:
                next_token = sample_logits(logits, top_k, top_p, temperature, freq_penalty, tokens=tokens)
            else:
                next_token = logits.argmax(dim=-1)
            if stop_at_eos:
                next_token = torch.where(finished, torch.full_like(next_token, eos_token_id), next_token)
                finished |= next_token == eos_token_id
            new_tokens = next_token[:, None]
            tokens = torch.cat([tokens, new_tokens], dim=1)
            if mask is not None:  # the new token is real in every row
                mask = torch.cat([mask, torch.ones_like(new_tokens)], dim=1)
            if stop_at_eos and finished.all():
                break
        if return_type == "tokens" or (return_type == "input" and not text_input):
            return tokens
        strings = self.to_string(tokens)
        return strings[0] if isinstance(input, str) or (return_type == "str" and len(strings) == 1) else strings

    # ------------------------------------------------------------------ tokenizer
    def set_tokenizer(self, tokenizer: PreTrainedTokenizerBase, default_padding_side: str | None = None) -> None:
        """Attach a tokenizer without any Hub access (unlike HookedTransformer.set_tokenizer)."""
        self.tokenizer = tokenizer
        if default_padding_side is not None:
            tokenizer.padding_side = default_padding_side
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        empty = tokenizer("")["input_ids"]
        self.cfg.tokenizer_prepends_bos = bool(empty) and empty[0] == tokenizer.bos_token_id
        if tokenizer.bos_token is None:
            self.cfg.default_prepend_bos = False

    def _require_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise ValueError("This model has no tokenizer: pass tokenizer= to from_pretrained or call set_tokenizer().")
        return self.tokenizer

    def to_tokens(
        self,
        input: str | list[str],
        prepend_bos: bool | None = USE_DEFAULT_VALUE,
        padding_side: Literal["left", "right"] | None = USE_DEFAULT_VALUE,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> Int[Tensor, "batch pos"]:
        """Token ids of a text or a list of texts (padded on ``padding_side``). ``forward`` builds the
        matching attention mask itself; ``to_tokens_and_mask`` returns both."""
        tokens, _ = self.to_tokens_and_mask(input, prepend_bos, padding_side, move_to_device, truncate)
        return tokens

    def to_tokens_and_mask(
        self,
        input: str | list[str],
        prepend_bos: bool | None = USE_DEFAULT_VALUE,
        padding_side: Literal["left", "right"] | None = USE_DEFAULT_VALUE,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        """``(tokens, attention_mask)``: the mask (1 for real tokens, 0 for pads) comes from the
        tokenizer, so a pad id that equals the BOS or EOS id is never confused with a real token."""
        tokenizer = self._require_tokenizer()
        if isinstance(input, list) and (not input or not all(isinstance(text, str) for text in input)):
            raise ValueError(
                "A list input must be a non-empty list of strings; pass token ids as a tensor (torch.tensor(ids))."
            )
        if padding_side not in (None, "left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        prepend_bos = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        texts = [input] if isinstance(input, str) else list(input)
        if prepend_bos and not self.cfg.tokenizer_prepends_bos:
            if tokenizer.bos_token is None:
                raise ValueError("The tokenizer has no BOS token; call with prepend_bos=False.")
            texts = [tokenizer.bos_token + text for text in texts]
        side = padding_side or tokenizer.padding_side or self.cfg.default_padding_side
        previous_side, tokenizer.padding_side = tokenizer.padding_side, side
        try:
            encoded = tokenizer(
                texts, return_tensors="pt", padding=True, truncation=truncate, max_length=self.cfg.n_ctx if truncate else None
            )
        finally:
            tokenizer.padding_side = previous_side
        tokens, mask = encoded["input_ids"], encoded["attention_mask"]
        if move_to_device:
            tokens, mask = tokens.to(self.cfg.device), mask.to(self.cfg.device)
        return tokens, mask

    def _tokenize(
        self, input: str | list[str], prepend_bos: bool | None, padding_side: str | None
    ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"] | None]:
        tokens, mask = self.to_tokens_and_mask(input, prepend_bos=prepend_bos, padding_side=padding_side)
        if tokens.shape[1] == 0:
            raise ValueError(f"{input!r} tokenizes to no tokens; pass a non-empty text (or prepend_bos=True).")
        return tokens, mask

    def to_string(self, tokens: Int[Tensor, "... pos"] | list[int]) -> str | list[str]:
        tokenizer = self._require_tokenizer()
        tokens = torch.as_tensor(tokens)
        if tokens.dim() <= 1:
            return tokenizer.decode(tokens.tolist())
        return [tokenizer.decode(row.tolist()) for row in tokens]

    def to_str_tokens(
        self,
        input: str | Int[Tensor, "pos"] | list[int],
        prepend_bos: bool | None = USE_DEFAULT_VALUE,
        padding_side: Literal["left", "right"] | None = USE_DEFAULT_VALUE,
    ) -> list[str]:
        tokenizer = self._require_tokenizer()
        if isinstance(input, str):
            input = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)[0]
        ids = torch.as_tensor(input).flatten().tolist()
        return [tokenizer.decode([token]) for token in ids]

    def to_single_token(self, string: str) -> int:
        tokens = self.to_tokens(string, prepend_bos=False)[0]
        if tokens.numel() != 1:
            raise ValueError(f"{string!r} is {tokens.numel()} tokens, not one: {self.to_str_tokens(tokens)}.")
        return int(tokens[0])

    # ------------------------------------------------------------------ weights and devices
    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.unembed.W_U

    @property
    def W_O(self) -> list[Float[Tensor, "head d_head d_model"] | None]:
        """Per layer, the output projection of its mixer (or else its attention), split by head; None
        for a layer with neither (NemotronH's MLP layers)."""
        mixers = [getattr(block, "mixer", None) or getattr(block, "attn", None) for block in self.blocks]
        return [None if mixer is None else mixer.W_O for mixer in mixers]

    def to(self, *args: Any, **kwargs: Any) -> "HookedSSM":
        device, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None:
            self.cfg.device = str(device)
        if dtype is not None:
            self.cfg.dtype = dtype
        return super().to(*args, **kwargs)

    def cuda(self, device: int | torch.device | None = None) -> "HookedSSM":
        return self.to(torch.device("cuda", device) if isinstance(device, int) else (device or "cuda"))

    def cpu(self) -> "HookedSSM":
        return self.to("cpu")
