"""SAELens evals on head-indexed write sites (writesae_lens.evals), without patching SAELens.

The model is the tiny random Qwen3.5 fixture with a sharpened unembedding, and the eval text is
its own greedy continuation of random prompts, so the clean model predicts the text well and
zero-ablating one head's cache writes measurably hurts: that makes "CE with the SAE lies between
the clean and the ablated loss" a real check. The SAE is a stock SAELens TopK SAE trained for a few
hundred steps (SAELens's own training step) on that head's writes.
"""

import math

import pytest
import torch
from datasets import Dataset
from sae_lens import (
    ActivationsStore,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens import evals as sae_lens_evals
from sae_lens.evals import EvalConfig, get_recons_loss
from sae_lens.llm_sae_training_runner import LLMSaeEvaluator
from sae_lens.saes.sae import SAEMetadata, TrainStepInput
from sae_lens.training.activation_scaler import ActivationScaler

from hooked_ssm import HookedSSM
from writesae_lens import (
    HeadAwareLLMSaeEvaluator,
    HeadAwareMultiSAEEvaluator,
    head_aware_model,
    install_head_aware_evaluator,
    run_evals,
)

WRITE = "blocks.0.mixer.hook_write"  # [batch, pos, 4 heads, 128]
HEAD, D_WRITE, N_HEADS, CTX = 1, 128, 4, 24
EVAL_ALL = EvalConfig(
    batch_size_prompts=8, n_eval_reconstruction_batches=2, n_eval_sparsity_variance_batches=2,
    compute_kl=True, compute_ce_loss=True, compute_l2_norms=True, compute_sparsity_metrics=True,
    compute_variance_metrics=True,
)


@pytest.fixture(scope="module")
def teacher(qwen35):
    # The recurrent form is the fast one for 24-token sequences on CPU.
    model = HookedSSM.from_pretrained(qwen35[0], execution="recurrent")
    model.unembed.weight = torch.nn.Parameter(model.embed.W_E.detach() * 6)  # untie and sharpen
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 300, (16, 4), generator=gen)
    tokens = model.generate(prompts, max_new_tokens=CTX - 4, do_sample=False, stop_at_eos=False, verbose=False)
    return model, tokens


@pytest.fixture(scope="module")
def dataset(teacher):
    return Dataset.from_dict({"input_ids": teacher[1].tolist()})


def write_metadata(head=HEAD):
    return SAEMetadata(hook_name=WRITE, hook_head_index=head, context_size=CTX, prepend_bos=False)


@pytest.fixture(scope="module")
def trained_sae(teacher):
    model, tokens = teacher
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[WRITE])
    acts = cache[WRITE][:, :, HEAD].reshape(-1, D_WRITE)
    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_WRITE, d_sae=256, k=16, metadata=write_metadata()))
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for step in range(200):
        batch = acts[torch.randint(0, acts.shape[0], (128,))]
        out = sae.training_forward_pass(TrainStepInput(
            sae_in=batch, coefficients={}, dead_neuron_mask=None, n_training_steps=step, is_logging_step=False,
        ))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    return sae.eval()


def store_for(model, sae, dataset):
    return ActivationsStore.from_sae(
        model=model, sae=sae, dataset=dataset, context_size=CTX, streaming=False,
        store_batch_size_prompts=8, train_batch_size_tokens=64, n_batches_in_buffer=4,
    )


def exact_sae(d_in, head):
    """relu(x) - relu(-x) = x: a StandardSAE that reconstructs its input exactly."""
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=2 * d_in, metadata=write_metadata(head)))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def finite(metrics):
    values = [v for group in metrics.values() for v in group.values()]
    return all(math.isfinite(v) for v in values)


def test_run_evals_on_a_head_indexed_write_sae(teacher, dataset, trained_sae):
    model, _ = teacher
    metrics, feature_metrics = run_evals(trained_sae, store_for(model, trained_sae, dataset), model,
                                         eval_config=EVAL_ALL, exclude_special_tokens=False)
    assert finite(metrics)
    ce = metrics["model_performance_preservation"]
    clean, with_sae, ablated = ce["ce_loss_without_sae"], ce["ce_loss_with_sae"], ce["ce_loss_with_ablation"]
    assert clean + 0.05 < ablated  # the head's writes matter on this text
    assert clean < with_sae < ablated, ce
    assert 0.2 < ce["ce_loss_score"] < 1
    variance = metrics["reconstruction_quality"]
    assert variance["explained_variance"] > 0.6, variance
    assert metrics["sparsity"]["l0"] == pytest.approx(16)
    kl = metrics["model_behavior_preservation"]
    assert 0 < kl["kl_div_with_sae"] < kl["kl_div_with_ablation"]
    assert len(feature_metrics["feature_density"]) == 256


def test_the_proxy_replaces_and_ablates_only_that_head(teacher, trained_sae):
    model, tokens = teacher
    batch = tokens[:4]
    per_token = get_recons_loss(trained_sae, head_aware_model(model, trained_sae), ActivationScaler(), batch,
                                compute_kl=False, compute_ce_loss=True)

    def edit_head(fn):
        def hook(x, hook):
            x = x.clone()
            x[:, :, HEAD] = fn(x[:, :, HEAD])
            return x
        return hook

    with torch.no_grad():
        sae_loss = model.run_with_hooks(batch, return_type="loss", loss_per_token=True, fwd_hooks=[
            (WRITE, edit_head(lambda x: trained_sae.decode(trained_sae.encode(x))))])
        ablated = model.run_with_hooks(batch, return_type="loss", loss_per_token=True,
                                       fwd_hooks=[(WRITE, edit_head(torch.zeros_like))])
    torch.testing.assert_close(per_token["ce_loss_with_sae"], sae_loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(per_token["ce_loss_with_ablation"], ablated, rtol=0, atol=1e-5)


def test_hooks_sae_lens_already_handles_pass_through(teacher):
    """hook_v has a head dim SAELens recognises by name: the proxy must not slice it a second time."""
    model, tokens = teacher
    sae = exact_sae(8, 1)  # d_v = 8
    sae.cfg.metadata.hook_name = "blocks.0.mixer.hook_v"
    batch = tokens[:4]
    per_token = get_recons_loss(sae, head_aware_model(model, sae), ActivationScaler(), batch,
                                compute_kl=False, compute_ce_loss=True)
    torch.testing.assert_close(per_token["ce_loss_with_sae"], per_token["ce_loss_without_sae"], rtol=0, atol=1e-6)

    def ablate_head(x, hook):
        x = x.clone()
        x[:, :, 1] = 0
        return x

    with torch.no_grad():
        ablated = model.run_with_hooks(batch, return_type="loss", loss_per_token=True,
                                       fwd_hooks=[("blocks.0.mixer.hook_v", ablate_head)])
    torch.testing.assert_close(per_token["ce_loss_with_ablation"], ablated, rtol=0, atol=1e-6)


def test_stock_sae_lens_evals_fail_on_this_site(teacher, dataset, trained_sae):
    """Why the proxy exists. If this starts passing, SAELens handles hook_head_index upstream."""
    model, _ = teacher
    with pytest.raises(RuntimeError):
        sae_lens_evals.run_evals(trained_sae, store_for(model, trained_sae, dataset), model, ActivationScaler(),
                                 EvalConfig(compute_ce_loss=True, n_eval_reconstruction_batches=1),
                                 exclude_special_tokens=False)


@pytest.mark.parametrize("head", [2, None], ids=["head2", "all_heads_flattened"])
def test_an_exact_sae_scores_one(teacher, dataset, head):
    model, _ = teacher
    sae = exact_sae(D_WRITE if head is not None else N_HEADS * D_WRITE, head)
    metrics, _ = run_evals(sae, store_for(model, sae, dataset), model, eval_config=EVAL_ALL,
                           exclude_special_tokens=False)
    ce = metrics["model_performance_preservation"]
    assert ce["ce_loss_with_sae"] == pytest.approx(ce["ce_loss_without_sae"], abs=1e-6)
    assert ce["ce_loss_with_ablation"] > ce["ce_loss_without_sae"]
    assert ce["ce_loss_score"] == pytest.approx(1, abs=1e-4)
    assert metrics["reconstruction_quality"]["explained_variance"] == pytest.approx(1, abs=1e-6)


def test_evaluators(teacher, dataset, trained_sae):
    model, _ = teacher
    store = store_for(model, trained_sae, dataset)
    fields = dict(model=model, activations_store=store, eval_batch_size_prompts=8, n_eval_batches=1, model_kwargs={})
    with pytest.raises(RuntimeError):  # SAELens's evaluator on this site
        LLMSaeEvaluator(**fields)(trained_sae, store, ActivationScaler())
    metrics = HeadAwareLLMSaeEvaluator(**fields)(trained_sae, store, ActivationScaler())
    assert finite(metrics) and metrics["model_performance_preservation"]["ce_loss_with_sae"] > 0
    multi = HeadAwareMultiSAEEvaluator(**fields)(
        {"h1": trained_sae}, store, {"h1": ActivationScaler()}, {"h1": WRITE})
    assert math.isfinite(multi["h1/model_performance_preservation"]["ce_loss_score"])


def test_in_training_evaluator_with_the_runner(teacher, dataset, monkeypatch):
    """LanguageModelSAETrainingRunner on head 1 of hook_write, evals on (wandb disabled), offline, CPU."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    model, _ = teacher
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=D_WRITE, d_sae=64, k=8),
        model_name="tiny-qwen35", hook_name=WRITE, hook_head_index=HEAD, dataset_path="in-memory",
        context_size=CTX, prepend_bos=False, training_tokens=10 * 48, train_batch_size_tokens=48,
        store_batch_size_prompts=4, n_batches_in_buffer=4, n_eval_batches=1, eval_batch_size_prompts=4,
        device="cpu", n_checkpoints=0, output_path=None,
        logger=LoggingConfig(log_to_wandb=True, wandb_log_frequency=5, eval_every_n_wandb_logs=1),
    )
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model)
    evaluator = install_head_aware_evaluator(runner)
    assert isinstance(runner.evaluator, HeadAwareLLMSaeEvaluator) and install_head_aware_evaluator(runner) is evaluator
    results = []
    runner.evaluator = lambda *args: results.append(evaluator(*args)) or results[-1]
    sae = runner.run()
    assert len(results) == 2 and all(finite({k: v for k, v in r.items() if isinstance(v, dict)}) for r in results)
    assert sae.cfg.metadata.hook_head_index == HEAD
