"""HookedSSM against the transformers reference on tiny random Qwen3.5 / Qwen3-Next checkpoints."""

import pytest
import torch

from hooked_ssm import HookedSSM

FIXTURES = ["qwen35", "qwen35_untied", "qwen35_vlm", "qwen3_next"]
# Not multiples of the 64-token chunk; one shorter than a chunk, one spanning three.
LENGTHS = [37, 150]


def reference_logits(hf_model, tokens):
    with torch.no_grad():
        return hf_model(input_ids=tokens, use_cache=False).logits


@pytest.mark.parametrize("fixture", FIXTURES)
@pytest.mark.parametrize("execution", ["chunked", "recurrent"])
def test_logits_match_transformers(fixture, execution, request):
    directory, hf_model = request.getfixturevalue(fixture)
    model = HookedSSM.from_pretrained(directory, execution=execution)
    for length in LENGTHS:
        tokens = torch.randint(3, model.cfg.d_vocab, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            logits = model(tokens)
        diff = (logits - reference_logits(hf_model, tokens)).abs().max().item()
        assert diff <= 1e-4, f"{fixture}/{execution}/T={length}: max |logit diff| {diff:.2e}"


def test_config_is_read_from_the_checkpoint(qwen3_next, qwen35_vlm):
    next_model = HookedSSM.from_pretrained(qwen3_next[0])
    assert next_model.cfg.layer_types == ["gated_deltanet", "gated_deltanet", "full_attention", "gated_deltanet", "full_attention"]
    assert next_model.cfg.moe_layers == [False, True, False, True, False]  # decoder_sparse_step=2
    assert (next_model.cfg.n_key_heads, next_model.cfg.n_heads) == (2, 4)
    assert not next_model.cfg.tie_word_embeddings
    vlm = HookedSSM.from_pretrained(qwen35_vlm[0])
    assert vlm.cfg.original_architecture == "Qwen3_5ForConditionalGeneration"
    assert vlm.W_U.data_ptr() == vlm.W_E.data_ptr()


def test_loss_matches_transformers(qwen35):
    directory, hf_model = qwen35
    model = HookedSSM.from_pretrained(directory)
    tokens = torch.randint(3, model.cfg.d_vocab, (2, 40))
    with torch.no_grad():
        expected = hf_model(input_ids=tokens, labels=tokens, use_cache=False).loss
        logits, loss = model(tokens, return_type="both")
        per_token = model(tokens, return_type="loss", loss_per_token=True)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert per_token.shape == (2, 39)
    torch.testing.assert_close(per_token.mean(), loss)


def test_left_padding_matches_unpadded_run(qwen35):
    """Padded tokens write nothing into the state and are masked out of attention."""
    model = HookedSSM.from_pretrained(qwen35[0])
    tokens = torch.randint(3, model.cfg.d_vocab, (1, 20))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), tokens], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 20, dtype=torch.long)], dim=1)
    with torch.no_grad():
        plain = model(tokens)
        masked = model(padded, attention_mask=mask)[:, 5:]
    # Attention positions differ by the pad offset (RoPE is relative, so scores are unchanged).
    torch.testing.assert_close(masked, plain, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_transformers(qwen35, side):
    """Real positions of a padded batch against transformers given the same attention mask."""
    directory, hf_model = qwen35
    model = HookedSSM.from_pretrained(directory)
    tokens = torch.randint(3, model.cfg.d_vocab, (2, 30), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(tokens)
    pads = slice(0, 11) if side == "left" else slice(19, 30)
    mask[1, pads] = 0
    with torch.no_grad():
        ours = model(tokens, attention_mask=mask)
        theirs = hf_model(input_ids=tokens, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-4


def test_stop_at_layer_returns_the_residual_stream(qwen35):
    model = HookedSSM.from_pretrained(qwen35[0])
    tokens = torch.randint(3, model.cfg.d_vocab, (2, 12))
    _, cache = model.run_with_cache(tokens, names_filter="blocks.2.hook_resid_pre")
    resid = model(tokens, stop_at_layer=2)
    torch.testing.assert_close(resid, cache["blocks.2.hook_resid_pre"])


def test_fused_and_hooked_attention_agree(qwen35):
    """Attention uses PyTorch's fused kernel unless a pattern hook is attached; both give the same result."""
    model = HookedSSM.from_pretrained(qwen35[0])
    tokens = torch.randint(3, model.cfg.d_vocab, (2, 40))
    with torch.no_grad():
        fused = model(tokens)
        hooked, cache = model.run_with_cache(tokens, names_filter="blocks.2.attn.hook_pattern")
    torch.testing.assert_close(hooked, fused, atol=1e-5, rtol=1e-5)
    pattern = cache["blocks.2.attn.hook_pattern"]
    torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))
    assert pattern.triu(1).abs().max() == 0  # causal
