"""Padded batches, as HookedTransformer handles them: a list of texts builds an attention mask, pads
write nothing into any recurrent state (left or right padding), attention ignores them and the loss
averages over real tokens only. The reference is each row run alone, unpadded."""

import pytest
import torch

from hooked_ssm import HookedSSM, RecurrentState

pytestmark = pytest.mark.usefixtures("one_thread")

TOYS = ["toy-gdn", "toy-mamba2", "toy-rwkv7"]
TEXTS = ["The state of every token is a matrix that later tokens read from", "Hi there"]
TOL = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture(scope="module", params=TOYS)
def toy(request):
    return HookedSSM.from_pretrained(request.param)


def alone(model, text):
    return model.to_tokens(text)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_row_equals_the_row_run_alone(toy, side):
    tokens, mask = toy.to_tokens_and_mask(TEXTS, padding_side=side)
    assert not mask.all()  # the batch really is padded
    with torch.no_grad():
        batch = toy(TEXTS, padding_side=side)
        for row, text in enumerate(TEXTS):
            own = alone(toy, text)
            real = mask[row].bool()
            torch.testing.assert_close(batch[row, real], toy(own)[0], **TOL)


@pytest.mark.parametrize("side", ["left", "right"])
def test_loss_averages_over_real_tokens_only(toy, side):
    with torch.no_grad():
        loss = toy(TEXTS, return_type="loss", padding_side=side)
        per_row = [toy(alone(toy, text), return_type="loss", loss_per_token=True)[0] for text in TEXTS]
    expected = torch.cat(per_row).mean()
    torch.testing.assert_close(loss, expected, **TOL)


def test_right_pads_leave_the_recurrent_state_untouched(toy):
    """After a row's last real token, its pads change no state: the state at the last (pad) column
    equals the state after the row's last token run alone."""
    name = "blocks.1.mixer.hook_state"
    tokens, mask = toy.to_tokens_and_mask(TEXTS, padding_side="right")
    with torch.no_grad():
        _, padded = toy.run_with_cache(tokens, attention_mask=mask, names_filter=name, pos_slice=-1)
        _, own = toy.run_with_cache(alone(toy, TEXTS[1]), names_filter=name, pos_slice=-1)
    assert not mask[1, -1]
    torch.testing.assert_close(padded[name][1], own[name][0], **TOL)


def test_a_right_padded_batch_cannot_be_continued(toy):
    tokens, mask = toy.to_tokens_and_mask(TEXTS, padding_side="right")
    with pytest.raises(ValueError, match="padding_side='left'"):
        toy(tokens, attention_mask=mask, past_state=RecurrentState.empty(toy.cfg.layer_types))


def test_batched_generation_matches_each_prompt_alone(toy):
    with torch.no_grad():
        batch = toy.generate(TEXTS, max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False,
                             return_type="tokens")
        for row, text in enumerate(TEXTS):
            own = toy.generate(text, max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False,
                               return_type="tokens")
            assert batch[row, -4:].tolist() == own[0, -4:].tolist()


def test_text_and_tensor_inputs_agree_with_an_explicit_mask(toy):
    tokens, mask = toy.to_tokens_and_mask(TEXTS, padding_side="left")
    with torch.no_grad():
        torch.testing.assert_close(toy(TEXTS, padding_side="left"), toy(tokens, attention_mask=mask))
