"""The paper's recipe through build_runner: the fixed, split, bf16-cast set of one head's inputs
(checked against the model's own hook), the runner configured for epochs over it, and training with
re-normalisation and resampling on a short schedule."""

import pytest
import torch

from hooked_ssm import HookedSSM
from writesae_lens.recipe import SiteCache, TrainingRecipe
from writesae_lens.training import build_runner

LAYER, HEAD = 1, 2


@pytest.fixture(scope="module")
def model(qwen35):
    return HookedSSM.from_pretrained(qwen35[0])


def small(**kwargs):
    return dict(d_sae=32, k=4, context_size=32, train_batch_size_tokens=64, **kwargs)


def test_the_fixed_set_is_the_heads_bf16_inputs_split_80_20_by_sequence(model, dataset, tmp_path):
    runner = build_runner(model, dataset, LAYER, HEAD, "state", cache_dir=tmp_path, **small())
    cache = runner.site_cache
    train, heldout = (SiteCache.open(cache.path).load(s) for s in ("train", "heldout"))
    assert (train.shape[0] + heldout.shape[0]) // 32 == len(dataset) and heldout.shape[0] // 32 == round(0.2 * len(dataset))
    import datasets

    tokens = {s: torch.tensor(datasets.load_from_disk(str(cache.split_path(s)))[:]["token_ids"]) for s in ("train", "heldout")}
    all_rows = torch.tensor(dataset[:]["input_ids"])
    # Which sequences are held out: a seed-42 permutation of the dataset's rows, the first 20%.
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(42))
    assert torch.equal(tokens["heldout"].long(), all_rows[order[: round(0.2 * len(dataset))]])
    # The cached inputs: the hook's head, rounded to bf16, on those very tokens.
    _, acts = model.run_with_cache(tokens["heldout"].long(), names_filter=runner.cfg.hook_name)
    expected = acts[runner.cfg.hook_name][:, :, HEAD].flatten(0, 1).flatten(1).bfloat16().float()
    torch.testing.assert_close(heldout, expected, atol=0, rtol=0)

    cfg = runner.cfg
    assert cfg.use_cached_activations and cfg.cached_activations_path == str(cache.split_path("train"))
    assert cfg.training_tokens == 20 * train.shape[0]  # 20 epochs
    assert cfg.dead_feature_window == 100 and cfg.dtype == "float32"
    assert (cfg.lr, cfg.lr_warm_up_steps, cfg.lr_scheduler_name) == (3e-4, 50, "cosineannealing")
    assert cfg.lr_end == pytest.approx(3e-5) and cfg.train_batch_size_tokens == 64  # 256 unless overridden
    # Its mean matrix is the training set's exactly (b_dec, in SAELens's training units).
    scale = cfg.sae.d_in**0.5 / train.double().norm(dim=-1).mean()
    torch.testing.assert_close(runner.sae.b_dec.detach().double(), train.double().mean(0) * scale, rtol=1e-5, atol=1e-7)
    # A second runner on the same cache reads the same set.
    again = build_runner(model, dataset, LAYER, HEAD, "state", site_cache=cache.path, **small())
    torch.testing.assert_close(again.site_cache.load("heldout"), heldout)


def test_training_resamples_and_renormalises_on_schedule(model, dataset, tmp_path):
    recipe = TrainingRecipe(epochs=4, renorm_every=7, resample_every=5, dead_after=2)
    runner = build_runner(model, dataset, LAYER, HEAD, "write", recipe=recipe, cache_dir=tmp_path,
                          architecture="writesae_matrix", lr=3e-3, **{**small(), "d_sae": 256, "k": 1})
    steps = runner.cfg.training_tokens // runner.cfg.train_batch_size_tokens
    assert steps == 4 * 77 * 32 // 64
    heldout = runner.site_cache.load("heldout")
    initial = runner.sae.to_write_site() if hasattr(runner.sae, "to_write_site") else runner.sae
    with torch.no_grad():
        before = (initial(heldout * 1) - heldout).pow(2).sum(-1).mean()
    trained = runner.run()
    assert runner.schedule.n_resampled > 0
    with torch.no_grad():
        after = (trained(heldout) - heldout).pow(2).sum(-1).mean()
    assert after < before
