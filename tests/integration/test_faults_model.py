"""Fault catalogue, model layer (HookedSSM): every bad input or bad hook gets an error that names the
problem and the fix. Each case: (id, call, exception type, what the message must contain)."""

from __future__ import annotations

import re

import pytest
import torch

from hooked_ssm import CheckpointError, HookedSSM, RecurrentState
from hooked_ssm.hook_checks import HookReturnError, NonFiniteActivationError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return HookedSSM.from_pretrained("toy-gdn")


TOKENS = torch.tensor([[5, 6, 7, 8]])
TEXTS = ["a longer text about the state", "Hi"]


def hooked(name, fn):
    return lambda m: m.run_with_hooks(TOKENS, fwd_hooks=[(name, fn)])


def add_hook_then_run(m):
    m.add_hook("blocks.0.mixer.hook_v", lambda act, hook: act[:, :1])
    try:
        m(TOKENS)
    finally:
        m.reset_hooks()


def nan_at_position_2(act, hook):
    act = act.clone()
    act[:, 2] = float("nan")
    return act


def right_padded_continuation(m):
    tokens, mask = m.to_tokens_and_mask(TEXTS, padding_side="right")
    m(tokens, attention_mask=mask, past_state=RecurrentState.empty(m.cfg.layer_types))


def padded_continuation_step(m):
    state = RecurrentState.empty(m.cfg.layer_types)
    m(TOKENS, past_state=state)
    m(torch.tensor([[9, 10]]), past_state=state, attention_mask=torch.tensor([[1, 1, 1, 1, 0, 1]]))


CASES = [
    ("bundled model misspelled", lambda m: HookedSSM.from_pretrained("toy-gdm"), CheckpointError,
     ["'toy-gdm'", "toy-gdn, toy-mamba2, toy-rwkv7", "Did you mean 'toy-gdn'?"]),
    ("unknown dtype name", lambda m: HookedSSM.from_pretrained("toy-gdn", dtype="float33"), ValueError,
     ["Unknown dtype 'float33'", "bfloat16"]),
    ("loss on one token", lambda m: m(torch.tensor([[5]]), return_type="loss"), ValueError,
     ["at least two", "shape (1, 1)", "return_type='logits'"]),
    ("loss on one real token of a padded row", lambda m: m(torch.tensor([[0, 5]]), return_type="loss",
     attention_mask=torch.tensor([[0, 1]])), ValueError, ["at least two (real) tokens"]),
    ("empty token tensor", lambda m: m(torch.zeros(1, 0, dtype=torch.long)), ValueError,
     ["no tokens", "at least one token"]),
    ("3-D token tensor", lambda m: m(torch.zeros(2, 2, 3, dtype=torch.long)), ValueError,
     ["[batch, pos]", "(2, 2, 3)", "Reshape"]),
    ("float token ids", lambda m: m(torch.ones(1, 3)), TypeError, ["integer tensor", "tokens.long()"]),
    ("token ids outside the vocabulary", lambda m: m(torch.tensor([[5, 10**6]])), ValueError,
     ["d_vocab", "tokenized for another model"]),
    ("list of token ids instead of a tensor", lambda m: m([1, 2, 3]), ValueError,
     ["list of strings", "torch.tensor(ids)"]),
    ("empty text", lambda m: m("", prepend_bos=False), ValueError, ["no tokens", "non-empty text"]),
    ("padding side misspelled", lambda m: m(TEXTS, padding_side="lft"), ValueError, ["'left' or 'right'"]),
    ("attention mask of the wrong shape", lambda m: m(TOKENS, attention_mask=torch.ones(1, 3)), ValueError,
     ["attention_mask has shape (1, 3)", "expected (1, 4)"]),
    ("attention mask not 0/1", lambda m: m(TOKENS, attention_mask=torch.full((1, 4), 2)), ValueError,
     ["only 0 (pad) and 1"]),
    ("right-padded batch continued from its state", right_padded_continuation, ValueError,
     ["right-padded", "padding_side='left'"]),
    ("pads inside a continued sequence", padded_continuation_step, ValueError,
     ["Pads inside a continued sequence", "padding_side='left'"]),
    ("max_new_tokens < 0", lambda m: m.generate("hi", max_new_tokens=-1, verbose=False), ValueError,
     ["max_new_tokens", "non-negative", "-1"]),
    ("generate with right padding", lambda m: m.generate(TEXTS, max_new_tokens=2, padding_side="right",
     verbose=False), ValueError, ["pads a batch of texts on the left", "Leave padding_side unset"]),
    ("state_positions out of range", lambda m: m(TOKENS, state_positions=[7]), ValueError,
     ["state_positions [7]", "4 tokens"]),
    ("hook returns one position's vector", hooked("blocks.0.hook_resid_pre", lambda act, hook: act[0, 0]),
     HookReturnError, ["blocks.0.hook_resid_pre", "returned shape (128,)", "expected (1, 4, 128)", "Return None"]),
    ("hook returns a python scalar", hooked("blocks.0.mixer.hook_k", lambda act, hook: 3.0), HookReturnError,
     ["blocks.0.mixer.hook_k", "returned a float", "(1, 4, 4, 32)"]),
    ("hook returns a 0-d tensor", hooked("blocks.1.mixer.hook_write", lambda act, hook: torch.tensor(3.0)),
     HookReturnError, ["blocks.1.mixer.hook_write", "returned shape ()", "expected (1, 4, 4, 1024)"]),
    ("hook returns one position of hook_k", hooked("blocks.0.mixer.hook_k", lambda act, hook: act[:, 1:2]),
     HookReturnError, ["blocks.0.mixer.hook_k", "returned shape (1, 1, 4, 32)", "expected (1, 4, 4, 32)"]),
    ("hook returns a lossy dtype", hooked("blocks.0.mixer.hook_q", lambda act, hook: act.double() + 1e-12),
     HookReturnError, ["blocks.0.mixer.hook_q", "torch.float64", "do not survive a cast", ".to(act.dtype)"]),
    ("permanent hook (add_hook) of the wrong shape", add_hook_then_run, HookReturnError,
     ["blocks.0.mixer.hook_v", "returned shape (1, 1, 4, 32)", "expected (1, 4, 4, 32)"]),
    ("edit of the observation-only write factors",
     hooked("blocks.0.mixer.hook_write_factors", lambda act, hook: act * 2), ValueError,
     ["observation-only", "edit blocks.0.mixer.hook_write"]),
    ("check_finite names the first non-finite hook",
     lambda m: m.run_with_hooks(TOKENS, fwd_hooks=[("blocks.1.mixer.hook_v", nan_at_position_2)], check_finite=True),
     NonFiniteActivationError, ["First non-finite value (nan)", "blocks.1.mixer.hook_v", "index [0, 2,"]),
]


@pytest.mark.parametrize("call, error, fragments", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_fault_gets_a_clear_error(model, call, error, fragments):
    with pytest.raises(error) as info:
        call(model)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert not re.search(r"Traceback|\bassert\b", message)


def test_hooks_that_keep_the_shape_still_work(model):
    """None, in-place edits, and a lossless dtype change are accepted (and cast back)."""
    with torch.no_grad():
        clean = model(TOKENS)
        seen = model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.mixer.hook_k", lambda act, hook: None)])
        widened = model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.mixer.hook_k", lambda act, hook: act.double())])
        in_place = model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.mixer.hook_v", lambda act, hook: act.mul_(0))])
    torch.testing.assert_close(seen, clean)
    torch.testing.assert_close(widened, clean)
    assert widened.dtype == clean.dtype
    assert not torch.allclose(in_place, clean)
